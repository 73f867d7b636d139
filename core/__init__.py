"""What every stage shares, and nothing that belongs to one stage: imports no stage package.

core.model       the whole RoBERTa in one file
core.hf          weight and config interchange with Hugging Face transformers (no transformers import)
core.tokenizer   the tokenizer files every stage reads: special ids, load, hash
core.checkpoint  the checkpoint layout: save, find, verify, read (consolidating any ZeRO stage)
core.hashing     sha256 of files
core.cli         the one command-line convention of every command
"""
