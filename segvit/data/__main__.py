"""``python -m segvit.data check ROOT ...``: check a dataset (see ``segvit.data.check``; exit status 1 when any file
is bad). ``python -m segvit.data ROOT ...``: write a synthetic dataset in the ADE20K layout (see
``segvit.data.synthetic``)."""
import sys

if sys.argv[1:2] == ["check"]:
    from segvit.data.check import main as check_main

    sys.exit(check_main(sys.argv[2:]))
else:
    from segvit.data.synthetic import main

    main()
