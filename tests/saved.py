"""Copies of an object through the ways users save it."""

import io
import pickle

import torch


def saved_copies(obj):
    """Returns `obj` after a pickle round trip and after `torch.save`/`torch.load`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return pickle.loads(pickle.dumps(obj)), torch.load(buffer, weights_only=False)
