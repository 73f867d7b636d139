"""Stage 3, checkpoint -> answers: HF-format export, fill-mask inference (CLI) and its HTTP server."""
