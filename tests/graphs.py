"""What the compile tests share: dynamo backends that record the graphs they are handed."""


class GraphRecorder(list):
    """A dynamo backend (``torch.compile(fn, backend=recorder)``) that keeps every FX graph it compiles
    and runs it eagerly; ``ops(i)`` lists the call targets of graph ``i``."""

    def __call__(self, gm, example_inputs):
        self.append(gm)
        return gm.forward

    def ops(self, i: int = 0) -> list:
        return [n.target for n in self[i].graph.nodes if n.op == "call_function"]

    @property
    def nonempty(self) -> int:
        """How many graphs hold at least one op (dynamo may hand over an empty one when it specializes a
        size it had traced as symbolic)."""
        return sum(1 for i in range(len(self)) if self.ops(i))


class InductorRecorder(GraphRecorder):
    """:class:`GraphRecorder` whose graphs are compiled by inductor, exactly as ``torch.compile``'s default
    backend does (``compile_fx``): the path users run, with the graphs counted."""

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.append(gm)
        return compile_fx(gm, example_inputs)


def assert_one_node_and_eager_numbers(backend: str, op, q, k, mask) -> None:
    """``attention(q, k, k, mask, backend=backend, return_lse=True)`` compiled with fullgraph=True (no grad)
    holds exactly one ``op`` node and returns eager's out and LSE."""
    import torch

    import attnlib

    assert attnlib.resolve_backend(q, k, k, mask, backend, return_lse=True) == backend

    def fn(q, k, v):
        return attnlib.attention(q, k, v, mask, backend=backend, return_lse=True)

    graphs = GraphRecorder()
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(fn, fullgraph=True, backend=graphs)(q, k, k)
        want = fn(q, k, k)
    torch._dynamo.reset()
    assert graphs.ops(0).count(op) == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
