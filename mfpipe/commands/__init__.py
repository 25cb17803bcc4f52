"""The commands of `mfpipe` that do not orchestrate, by area; `mfpipe.cli` lists and registers them."""
