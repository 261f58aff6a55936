"""Tensor helpers of the generation code and the model scripts: copies to the GPU and back that never wait for the
GPU's queued work, and left padding. torch is imported where it is used, so that the model scripts can import this
module before the checks (which import no torch) have run."""


def to_device(tensors, device):
    """The tensors concatenated on `device`, each copied straight into its place: no concatenated copy on the
    CPU first, and from the loader's pinned memory the copies run while the CPU goes on."""
    import torch
    rows = sum(len(tensor) for tensor in tensors)
    out = torch.empty((rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype, device=device)
    start = 0
    for tensor in tensors:
        out[start:start + len(tensor)].copy_(tensor, non_blocking=True)
        start += len(tensor)
    return out


def stack_to_device(tensors, device):
    """torch.stack(tensors) on `device`, each tensor copied into its place (to_device)."""
    return to_device([tensor[None] for tensor in tensors], device)


def to_device_async(tensor, device):
    """A CPU tensor on `device`, copied through pinned memory so that the CPU does not wait for the GPU's queued work
    (a copy from pageable memory, as torch.tensor(..., device=...) makes, waits for it)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A tensor's copy to the CPU that does not wait for the GPU's queued work; result() waits for this copy alone,
    so a loop can launch its next GPU step first and read the copy while that step runs."""

    def __init__(self, tensor):
        import torch
        self.copied = None
        if tensor.device.type != "cuda":
            self.host = tensor
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def result(self):
        if self.copied is not None:
            self.copied.synchronize()
        return self.host


def left_padded(id_lists, pad_token_id):
    """(input ids, attention mask) of token id lists, left-padded to the longest, as CPU tensors."""
    import torch
    length = max(map(len, id_lists))
    ids = torch.tensor([[pad_token_id] * (length - len(x)) + x for x in id_lists])
    mask = torch.tensor([[0] * (length - len(x)) + [1] * len(x) for x in id_lists])
    return ids, mask


def mask_positions(mask):
    """Position ids of left-padded rows as generate() makes them from the attention mask: each real token counts
    the real tokens before it; padding gets 0."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
