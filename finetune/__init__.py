"""Stage 4: fine-tuning and downstream evaluation (`python -m finetune task=<name> model=<dir>`)."""
