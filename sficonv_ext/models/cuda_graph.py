"""Inference replayed from a CUDA graph: one launch for the whole network, for one fixed input
shape, dtype and autocast setting (captured on the first call)."""
import torch
import torch.nn as nn


def _version(tensor):
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor has no version counter (nor in-place writes)
        return None


class CUDAGraphInference(nn.Module):
    """Wraps an eval-only CUDA ``network``. The first call captures ``network(x)`` for x's
    shape, dtype and the autocast state in force; later calls copy x into the captured input
    and replay. A call that differs in any of those raises ``ValueError`` instead of replaying
    a graph recorded for other sizes. Outputs are fresh tensors (the graph's own output buffer
    is overwritten by the next replay).

    The graph reads the weights at the addresses they had at capture, and the cuDNN layers'
    copies cast from them: a weight that moved (``.to()``, ``load_state_dict(assign=True)``)
    or was changed in place (``load_state_dict``) makes the next call capture again."""

    WARMUP_CALLS = 3  # before capture: lazy initialisation, kernel compilation, autotuning

    def __init__(self, network):
        super().__init__()
        self.network = network
        self._graph = None
        self._key = None
        self._static_input = None
        self._static_output = None
        self._weights = None
        self._slots = None

    def _weight_slots(self):
        # Where every weight lives (its module's dict and name), found once: walking the module
        # tree on every replay cost 130 us (ResNet-26) to 630 us (ResNet-152) on the CPU.
        return [(table, name) for m in self.network.modules()
                for table in (m._parameters, m._buffers) for name in table]

    def _weights_key(self):
        # Address and version counter of every weight: what a replay's correctness rests on.
        # Read through the slots, so a weight replaced in its module (assign=True, .to()) counts.
        return tuple(None if t is None else (t.data_ptr(), _version(t))
                     for t in (table.get(name) for table, name in self._slots))

    @staticmethod
    def _signature(x):
        amp = torch.is_autocast_enabled("cuda")
        return (tuple(x.shape), x.dtype, x.device, amp,
                torch.get_autocast_dtype("cuda") if amp else None)

    def _capture(self, x):
        """Warm up, then record ``network`` on x's device. The wrapper's state is set only once
        the capture has succeeded, so a failed capture leaves it uncaptured, not half-made."""
        # A normal tensor even when captured under inference_mode: later calls outside it copy
        # into this buffer, which an inference tensor refuses.
        with torch.inference_mode(False):
            static_input = x.detach().clone()
        with torch.cuda.device(x.device):
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP_CALLS):
                    self.network(static_input)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # An explicit capture stream on x's device: the default one is created on whichever
            # device was current when it was first used.
            with torch.cuda.graph(graph, stream=side):
                static_output = self.network(static_input)
        self._graph, self._static_input, self._static_output = graph, static_input, static_output

    @staticmethod
    def _describe(key):
        shape, dtype, device, amp, amp_dtype = key
        return f"{list(shape)} {dtype} on {device} (autocast {amp_dtype if amp else 'off'})"

    @torch.no_grad()
    def forward(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_cuda:
            raise ValueError("a CUDA-graph model takes a CUDA tensor, got "
                             f"{x.device if isinstance(x, torch.Tensor) else type(x).__name__}")
        key = self._signature(x)
        if self._graph is not None and self._weights_key() != self._weights:
            self._graph = None  # the weights moved or changed: capture again
        if self._graph is None:
            self.network(x)  # validates the input with the network's own clear errors
            self._capture(x)
            self._key = key
            self._slots = self._weight_slots()
            self._weights = self._weights_key()
        elif key != self._key:
            raise ValueError(
                f"this CUDA-graph model was captured for input {self._describe(self._key)}; got "
                f"{self._describe(key)}. Build another with fuse_for_inference(model, "
                "cuda_graph=True) for each input shape")
        self._static_input.copy_(x)
        self._graph.replay()
        return self._static_output.clone()
