import sys

from torch import distributed

from .cli import main
from .parallel import exit_process

code = main()
if distributed.is_torchelastic_launched():  # under torchrun: see exit_process
    exit_process(code)
sys.exit(code)
