"""The data's path: rows (load.py) -> token ids exact at the prompt/response boundary (tokenize.py) ->
batches (batch.py)."""
