"""``python -m segvit.data ROOT``: write a synthetic dataset in the ADE20K layout (see ``segvit.data.synthetic``)."""
from segvit.data.synthetic import main

main()
