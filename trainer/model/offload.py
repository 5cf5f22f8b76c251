"""Activation offload: the activations a checkpointed forward pass saves for backward wait in pinned CPU memory.

With gradient checkpointing the forward pass saves little besides each block's input (torch's non-reentrant
checkpoint saves it through autograd's saved-tensor hooks, as every other saved activation); these hooks move
every such tensor of at least MIN_BYTES that is not a parameter to CPU memory as it is saved, on a side CUDA
stream so the copy overlaps the forward pass, and bring it back when backward needs it. The GPU memory of a
tensor on its way out is kept until its copy is done (Tensor.record_stream). On a CPU-only machine the tensor
is copied within the same memory: the same code path, for tests, and nothing saved.

trainer/model/loss.LMWithLoss runs its forward pass under these hooks when the plan says activation_offload;
the planner counts the bytes moved (trainer/plan/memory.py) and their cost (trainer/plan/cost.py).
"""
import torch

MIN_BYTES = 1024  # smaller tensors cost more in copies than they free


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """`with ActivationOffload():` around a forward pass (see the module docstring)."""

    def __init__(self):
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.moved_bytes = 0  # bytes sent to host memory so far (what the plan counts, for a look afterwards)
        super().__init__(self.pack, self.unpack)

    def pack(self, tensor):
        if isinstance(tensor, torch.nn.Parameter) or tensor.untyped_storage().nbytes() < MIN_BYTES \
                or tensor.device.type == "meta":
            return tensor  # weights stay where they are; small tensors are not worth a copy
        self.moved_bytes += tensor.untyped_storage().nbytes()
        if tensor.device.type != "cuda":
            return ("host", tensor.device, tensor.clone())
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        tensor.record_stream(self.stream)  # its memory is reused only once the copy has read it
        return ("host", tensor.device, host, done)

    def unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        device, host = packed[1], packed[2]
        if device.type != "cuda":
            return host
        torch.cuda.current_stream(device).wait_event(packed[3])
        return host.to(device, non_blocking=True)
