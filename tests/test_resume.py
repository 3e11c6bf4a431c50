"""segvit.train survives being killed anywhere (issue 11): atomic checkpoints, ``--resume auto``, exact resume with a
consistent log, the final evaluation, clear resume errors, data independent of the number of loader workers."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from segvit import _atomic
from segvit.data import write_synthetic_ade20k

from conftest import DATA

TINY = os.path.join(DATA, "tiny_train_config.json")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("WORLD_SIZE", "SEGVIT_FAULT_AT", "SEGVIT_FAULT_BYTES"):
        env.pop(key, None)
    env.update(extra)
    return env


def _log(work_dir):
    with open(os.path.join(work_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 10 images, batch 2: 5 batches per epoch, so 8 iterations cross an epoch boundary
    root = tmp_path_factory.mktemp("resume") / "ADEChallengeData2016"
    return write_synthetic_ade20k(str(root), num_train=10, num_val=2, num_classes=4, size=(64, 80), seed=3)


@pytest.fixture(scope="module")
def dropout_config(tmp_path_factory):
    with open(TINY) as f:
        cfg = json.load(f)
    backbone = cfg["model"]["backbone"]
    backbone.update(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)  # every kind of random mask
    path = tmp_path_factory.mktemp("cfg") / "tiny_dropout.json"
    path.write_text(json.dumps(cfg))
    return str(path)


# -- fault injection -----------------------------------------------------------------------------------------

# A process that imports the training once and forks one child per run: each child is a whole training process,
# SIGKILLed for real, without paying torch's import each time (the parent never computes, so forking is safe).
_SERVER = r"""
import json, os, sys, traceback
import torch, tqdm
import segvit, segvit.data, segvit.eval, segvit.optim, segvit.pretrained, segvit.train
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            out = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.environ.update(job["env"])
            segvit.train.main(job["argv"])
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    print(json.dumps({"status": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)
"""


class _Trainer:
    def __init__(self, out):
        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], env=_env(), cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def start(self, argv, **env) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "out": self.out}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"]

    def wait(self) -> int:
        line = self.proc.stdout.readline()
        assert line, "the training server died"
        return json.loads(line)["status"]

    def run(self, argv, **env) -> int:
        self.start(argv, **env)
        return self.wait()

    def tail(self) -> str:
        with open(self.out) as f:
            return f.read()[-3000:]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _alive(pid) -> bool:
    try:
        os.kill(pid, 0)  # the server reaps its children at once
        return True
    except ProcessLookupError:
        return False


def test_sigkill_anywhere_then_resume_auto_equals_an_uninterrupted_run(tmp_path, data, dropout_config):
    """The tiny training (dropout and drop-path on), SIGKILLed inside every kind of write (checkpoint, latest,
    best, the log's cut-back on resume), between iterations and at wall-clock points, resumed with --resume auto
    each time: the log holds each iteration once with the losses, and the final weights, bit for bit those of the
    uninterrupted run. After every kill each .pth of the work dir loads."""
    args = ["--config", dropout_config, "--data", data, "--iters", "8", "--batch-size", "2", "--log-interval", "1",
            "--checkpoint-interval", "2", "--eval-interval", "3", "--max-keep-ckpts", "2", "--workers", "0",
            "--no-progress"]
    reference, work = str(tmp_path / "reference"), str(tmp_path / "killed")
    trainer = _Trainer(str(tmp_path / "out.txt"))
    try:
        began = time.monotonic()
        assert trainer.run(args + ["--work-dir", reference]) == 0, trainer.tail()
        duration = time.monotonic() - began
        resume = args + ["--work-dir", work, "--resume", "auto"]

        def files(folder=work):
            names = set(os.listdir(folder))
            for name in names:
                if name.endswith(".pth"):  # complete, or not there at all
                    state = torch.load(os.path.join(folder, name), weights_only=True)
                    assert {"model", "optimizer", "iteration", "rng"} <= set(state), name
            return {n for n in names if not n.endswith(_atomic.TEMP_SUFFIX)}, \
                any(n.endswith(_atomic.TEMP_SUFFIX) for n in names)

        def logged():
            return [(r["iter"], "mIoU" in r) for r in _atomic.read_jsonl(os.path.join(work, "log.jsonl"))]

        faults = [  # (SEGVIT_FAULT_AT, what the work dir holds after the kill)
            # inside torch.save of iter_2.pth: a partial temporary, nothing else
            ("ckpt:1:write", lambda names, temp: temp and names == {"log.jsonl"}),
            # its temporary complete and fsynced, not yet renamed
            ("ckpt:1:synced", lambda names, temp: temp and names == {"log.jsonl"}),
            # iter_2.pth in place, latest.pth not yet made
            ("ckpt:1:replaced", lambda names, temp: names == {"log.jsonl", "iter_2.pth"}),
            # resumed at 2 (latest.pth made, a link of iter_2.pth); inside the save of best_mIoU_iter_3.pth (no
            # iter_3.pth to link)
            ("best:1:write", lambda names, temp: temp and names == {"log.jsonl", "iter_2.pth", "latest.pth"}),
            # the best in place, its evaluation not yet logged: evaluated again on resume
            ("best:1:replaced", lambda names, temp: "best_mIoU_iter_3.pth" in names and logged()[-1] == (3, False)),
            # iter_4.pth saved, latest.pth (a link) not yet renamed onto it
            ("latest:1:synced", lambda names, temp: temp and "iter_4.pth" in names and logged().count((3, True)) == 1
             and os.path.samefile(os.path.join(work, "latest.pth"), os.path.join(work, "iter_2.pth"))),
            # resumed at 4: iteration 5 logged, then killed: the log is cut back to 4 on resume ...
            ("step:1:end", lambda names, temp: logged()[-1] == (5, False)),
            # ... and that cut-back itself killed before its fsync: the log as it was
            ("log:1:write", lambda names, temp: temp and logged()[-1] == (5, False)),
            # ... and after its rename: cut back
            ("log:1:replaced", lambda names, temp: logged()[-1] == (4, False)),
            # evaluation at 6 beats the one at 3: best_mIoU_iter_6.pth in place (a link of iter_6.pth), the old best
            # not yet removed, the evaluation not logged
            ("best:1:replaced", lambda names, temp: {"best_mIoU_iter_3.pth", "best_mIoU_iter_6.pth"} <= names
             and logged()[-1] == (6, False)),
        ]
        for fault, expected in faults:
            status = trainer.run(resume, SEGVIT_FAULT_AT=fault, SEGVIT_FAULT_BYTES="20000")
            assert status == -signal.SIGKILL, (fault, status, trainer.tail())
            assert expected(*files()), (fault, sorted(os.listdir(work)), logged())
        assert trainer.run(resume) == 0, trainer.tail()
        # wall-clock kills, in a work dir of their own: at a random point of a run (a fraction of the reference's
        # duration), until one completes. The reference may have run slower than these (a loaded machine, a cold
        # start): a fresh run that completes before its first kill starts over in an empty folder, sooner.
        rng = random.Random(11)
        kills, scale, clock = 0, duration, str(tmp_path / "clock")
        for _ in range(10):
            pid = trainer.start(args + ["--work-dir", clock, "--resume", "auto"])
            time.sleep(rng.uniform(0.2, 0.8) * scale)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # finished first
                pass
            status = trainer.wait()
            assert status in (0, -signal.SIGKILL), trainer.tail()
            files(clock)  # every checkpoint complete
            if status == -signal.SIGKILL:
                kills += 1
            elif kills:
                break
            else:
                shutil.rmtree(clock)
                scale /= 2
            if kills == 4:
                break
        assert kills, "no run of the tiny training was ever killed by the clock"
        assert trainer.run(args + ["--work-dir", clock, "--resume", "auto"]) == 0, trainer.tail()
    finally:
        trainer.close()

    expected = _without_time(_log(reference))
    assert [r["iter"] for r in expected if "loss" in r] == list(range(1, 9))
    assert [r["iter"] for r in expected if "mIoU" in r] == [3, 6, 8]
    for work in (str(tmp_path / "killed"), clock):
        assert _without_time(_log(work)) == expected  # each iteration once, every loss and mIoU bit for bit
        names = sorted(n for n in os.listdir(work) if n.endswith(".pth"))
        assert names == sorted(n for n in os.listdir(reference) if n.endswith(".pth"))
        assert "latest.pth" in names and "iter_8.pth" in names and len([n for n in names if n.startswith("iter_")]) == 2
        assert len([n for n in names if n.startswith("best_mIoU_iter_")]) == 1
        assert not [n for n in os.listdir(work) if n.endswith(_atomic.TEMP_SUFFIX)]
        for name in names:
            a = torch.load(os.path.join(reference, name), weights_only=True)
            b = torch.load(os.path.join(work, name), weights_only=True)
            assert a["iteration"] == b["iteration"], name
            for key, value in a["model"].items():
                assert torch.equal(value, b["model"][key]), (name, key)
            for index, group in a["optimizer"]["state"].items():
                for key, value in group.items():
                    assert torch.equal(value, b["optimizer"]["state"][index][key]), (name, index, key)
            assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"]), name
        assert os.path.samefile(os.path.join(work, "latest.pth"), os.path.join(work, "iter_8.pth"))


def test_a_fault_inside_atomic_save_leaves_the_previous_file(tmp_path):
    path = str(tmp_path / "x.pth")
    _atomic.atomic_save({"a": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise TypeError("no pickling")

    with pytest.raises(TypeError) as info:
        _atomic.atomic_save({"a": Unpicklable()}, path)
    assert any(path in note for note in getattr(info.value, "__notes__", []))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["x.pth"]  # the temporary is gone
    (tmp_path / f".x.pth.123-4{_atomic.TEMP_SUFFIX}").write_bytes(b"partial")
    assert _atomic.remove_stale_temporaries(str(tmp_path)) == [f".x.pth.123-4{_atomic.TEMP_SUFFIX}"]
    assert _atomic.atomic_link(path, str(tmp_path / "latest.pth")) in ("link", "copy")
    assert torch.equal(torch.load(tmp_path / "latest.pth", weights_only=True)["a"], torch.ones(3))
    _atomic.atomic_link(path, str(tmp_path / "latest.pth"))  # again (a rename onto the same file would do nothing)
    assert sorted(os.listdir(tmp_path)) == ["latest.pth", "x.pth"]


def test_every_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    from segvit import train

    random.seed(3)
    np = pytest.importorskip("numpy")
    np.random.seed(4)
    torch.manual_seed(5)
    torch.save({"rng": [train._rng_state()]}, tmp_path / "rng.pth")
    first = (random.random(), float(np.random.rand()), torch.rand(1).item())
    train._set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"], 0, 1, "rng.pth")
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == first


# -- resume: exact, consistent log, final evaluation, errors ---------------------------------------------------

@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # in-process runs: fast on a loaded machine
    yield
    torch.set_num_threads(threads)


def _common(config, data_root, iters=6):
    return ["--config", config, "--data", data_root, "--log-interval", "1", "--no-progress", "--iters", str(iters),
            "--batch-size", "2", "--workers", "0"]


def test_resume_in_place_keeps_each_iteration_once_and_runs_the_final_evaluation(tmp_path, data, dropout_config,
                                                                                 one_thread):
    from segvit import train

    work = str(tmp_path / "w")
    common = _common(dropout_config, data) + ["--work-dir", work, "--checkpoint-interval", "3",
                                              "--eval-interval", "6"]
    first = train.main(common)
    reference = _without_time(_log(work))
    assert [r["iter"] for r in reference] == [1, 2, 3, 4, 5, 6, 6]
    # resumed at 3 in the same work dir (as after a kill at iteration 5): iterations 4..6 replaced, once each
    with pytest.warns(UserWarning, match=r"starting at iteration 3: removed .*iter_6\.pth, past that iteration"):
        result = train.main(common + ["--resume", os.path.join(work, "iter_3.pth")])
    assert result["start"] == 3
    assert _without_time(_log(work)) == reference
    # killed during the final evaluation: resuming the checkpoint at max_iters runs it (before: exit 0, no eval)
    with open(os.path.join(work, "log.jsonl")) as f:
        lines = f.readlines()
    with open(os.path.join(work, "log.jsonl"), "w") as f:
        f.writelines(lines[:-1])
    result = train.main(common + ["--resume", "auto"])
    assert result["start"] == 6 and result["eval"]["mIoU"] == first["eval"]["mIoU"]
    assert _without_time(_log(work)) == reference
    # logged already: nothing runs again, the logged evaluation is returned
    result = train.main(common + ["--resume", "auto"])
    assert result["eval"]["mIoU"] == first["eval"]["mIoU"] and _without_time(_log(work)) == reference
    with pytest.raises(FileExistsError, match="--resume auto"):  # a fresh run would mix two runs' files
        train.main(common)


def test_resume_auto_skips_a_checkpoint_that_does_not_load(tmp_path, data, one_thread):
    from segvit import train

    work = tmp_path / "w"
    common = _common(TINY, data, iters=4) + ["--work-dir", str(work), "--checkpoint-interval", "2",
                                             "--eval-interval", "0"]
    train.main(common)
    reference = _log(work)
    data_4 = (work / "iter_4.pth").read_bytes()
    (work / "latest.pth").unlink()
    (work / "iter_4.pth").write_bytes(data_4[: len(data_4) // 2])  # what a kill inside a plain torch.save leaves
    with pytest.warns(UserWarning, match=r"skipping .*iter_4\.pth: --resume .*not a complete checkpoint"):
        result = train.main(common + ["--resume", "auto"])
    assert result["resumed_from"].endswith("iter_2.pth")
    assert [r["loss"] for r in _log(work)] == [r["loss"] for r in reference]
    torch.load(work / "iter_4.pth", weights_only=True)  # rewritten whole
    assert os.path.samefile(work / "latest.pth", work / "iter_4.pth")


def test_resume_errors_name_the_file_and_say_what_to_do(tmp_path, data, one_thread):
    from segvit import train
    from segvit.train import load_training_state

    empty = tmp_path / "iter_20.pth"
    empty.write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"iter_20\.pth: the file is empty \(0 bytes\)"):
        load_training_state(str(empty))
    import segvit
    from conftest import tiny_config

    weights = tmp_path / "weights.pth"
    torch.save(segvit.build_model(tiny_config()).state_dict(), weights)
    with pytest.raises(ValueError, match=r"weights\.pth: these are a model's weights .*--pretrained .*"
                                         r"segvit\.load_checkpoint"):
        train.main(_common(TINY, data, iters=1) + ["--work-dir", str(tmp_path / "w"), "--resume", str(weights)])
    torch.save({"iteration": 3}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd\.pth: not a segvit.train checkpoint: it lacks model"):
        load_training_state(str(tmp_path / "odd.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_training_state(str(tmp_path / "nope.pth"))


# -- data independent of the number of workers ---------------------------------------------------------------

def test_batches_and_losses_do_not_depend_on_the_number_of_workers(tmp_path, data, dropout_config):
    """Before: the main process (--workers 0) resized with all its threads, workers with one; ATen's bilinear
    resize rounds differently, so some pixels (and the losses, by ~1e-5) differed."""
    from segvit import train
    from segvit.data import build_dataset
    from segvit.eval import load_config

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the main process with several threads, as on any multi-core machine
    try:
        losses = {}
        for workers in (0, 2):
            work = tmp_path / f"w{workers}"
            train.main(_common(dropout_config, data, iters=3)[:-1] + [str(workers), "--work-dir", str(work),
                                                                      "--eval-interval", "0"])
            losses[workers] = [r["loss"] for r in _log(work)]
        assert losses[0] == losses[2]  # bitwise
        cfg = load_config(dropout_config)
        dataset = build_dataset(cfg, "train", data, seed=0)
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0,
                                                      drop_last=True)
        batches = {}
        for workers in (0, 2):
            loader = torch.utils.data.DataLoader(
                train._OneThread(dataset) if workers == 0 else dataset,
                batch_sampler=train._EpochBatches(sampler, 2, 0), num_workers=workers, collate_fn=train._collate,
                worker_init_fn=train._worker_init)
            it = iter(loader)
            batches[workers] = [next(it) for _ in range(8)]
            del it
        for (a_img, a_lab), (b_img, b_lab) in zip(batches[0], batches[2]):
            assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    finally:
        torch.set_num_threads(threads)
