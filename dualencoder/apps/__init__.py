"""What a person does with a trained model directory: one module per job, each a command.

    python -m dualencoder.apps.index     # embed a folder of photos into an index (incremental)
    python -m dualencoder.apps.query     # text -> photos, photo -> photos, from an index
    python -m dualencoder.apps.serve     # the same in a small web page on 127.0.0.1
    python -m dualencoder.apps.classify  # zero-shot classification with prompt templates
    python -m dualencoder.apps.export    # ONNX graphs of both towers, checked against PyTorch

They sit at the top of the data flow, beside the demo notebook: they load what a user has (a
directory saved by `run_contrastive.py`, through `AutoModel` / `AutoProcessor`, or its ONNX
export) and nothing of training. See doc/USING_A_MODEL.md.
"""
