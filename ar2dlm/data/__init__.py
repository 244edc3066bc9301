"""The one data layer behind training, evaluation and likelihood scoring.

    sources.py   where raw records come from: local files (.jsonl, .jsonl.gz, .json, .parquet, .txt) and hub datasets
    records.py   reading JSON lines, and turning a raw record into a conversation or plain text
    tokenize.py  chat-template rendering, response spans, tokenised examples, the held-out split
    batching.py  padded batches, and the endless, exactly resumable training batcher

Every problem with the user's data is one `Ar2dlmError` line naming the file and line (or dataset row).
"""
