"""`python -m finetune task=<name> model=<dir>`: see finetune/train.py."""
from finetune.train import main

main()
