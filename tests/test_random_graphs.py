"""Random valid graphs composed from the supported operators must prune exactly.

Hypothesis composes blocks (convs, grouped and depthwise convs, residual adds,
concats, splits, channel shuffles, pixel shuffles, channels-last MatMuls,
SE gates, slices, pools, flatten into Gemm). Every generated model must prune
into a valid model whose outputs equal the soft-pruned model's.
"""

import numpy as np
from builder import Graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spa


class Net:
    def __init__(self, draw):
        self.draw = draw
        self.g = Graph(opset=21, seed=draw(st.integers(0, 2**16)))  # 21: GroupNormalization with per-channel params
        self.t = self.g.input("x", [1, 3, 8, 8])
        self.c = 3
        self.side = 8

    def channels(self):
        return self.draw(st.sampled_from([4, 6, 8, 12]))

    def act(self, t):
        kind = self.draw(st.sampled_from(["Relu", "silu", "HardSwish", "none"]))
        if kind == "none":
            return t
        if kind == "silu":
            return self.g.op("Mul", [t, self.g.op("Sigmoid", [t])])
        return self.g.op(kind, [t])

    def conv(self, t, cin, cout, group=1, k=3):
        g = self.g
        y = g.conv(t, cin, cout, k=k, group=group, bias=self.draw(st.booleans()))
        if self.draw(st.booleans()):
            y = g.op(
                "BatchNormalization",
                [y, g.weight(cout, low=0.5), g.weight(cout), g.weight(cout), g.weight(cout, low=0.5, high=1.5)],
            )
        return self.act(y)

    # blocks: each maps (self.t, self.c) to a new (self.t, self.c)
    def plain(self):
        cout = self.channels()
        self.t, self.c = self.conv(self.t, self.c, cout), cout

    def grouped(self):
        groups = self.draw(st.sampled_from([d for d in (2, 3, 4) if self.c % d == 0] or [1]))
        cout = groups * self.draw(st.sampled_from([2, 3]))
        self.t, self.c = self.conv(self.t, self.c, cout, group=groups), cout

    def depthwise(self):
        mult = self.draw(st.sampled_from([1, 2]))
        self.t, self.c = self.conv(self.t, self.c, self.c * mult, group=self.c), self.c * mult

    def residual(self):
        mid = self.channels()
        body = self.conv(self.conv(self.t, self.c, mid), mid, self.c)
        self.t = self.g.op("Add", [body, self.t])

    def concat(self):
        a, b = self.channels(), self.channels()
        self.t = self.g.op("Concat", [self.conv(self.t, self.c, a), self.conv(self.t, self.c, b)], axis=1)
        self.c = a + b

    def split(self):
        if self.c < 2:
            return self.plain()
        first = self.draw(st.integers(1, self.c - 1))
        left, right = self.g.op("Split", [self.t, self.g.const(np.array([first, self.c - first]))], n_out=2, axis=1)
        cout = self.channels()
        self.t = self.g.op("Add", [self.conv(left, first, cout), self.conv(right, self.c - first, cout)])
        self.c = cout

    def shuffle(self):
        if self.c % 2:
            return self.plain()
        g, s = self.g, self.side
        r = g.op("Reshape", [self.t, g.const(np.array([1, 2, self.c // 2, s, s]))])
        t = g.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
        self.t = g.op("Reshape", [t, g.const(np.array([1, self.c, s, s]))])

    def pixel(self):
        if self.c % 4:
            return self.plain()
        mode = self.draw(st.sampled_from(["DCR", "CRD"]))
        d = self.g.op("DepthToSpace", [self.t], blocksize=2, mode=mode)
        d = self.conv(d, self.c // 4, self.c // 4)
        self.t = self.g.op("SpaceToDepth", [d], blocksize=2)

    def channels_last(self):
        g = self.g
        t = g.op("Transpose", [self.t], perm=[0, 2, 3, 1])
        cout = self.channels()
        h = self.act(g.op("MatMul", [t, g.weight(self.c, cout)]))
        self.t, self.c = g.op("Transpose", [h], perm=[0, 3, 1, 2]), cout

    def se(self):
        g = self.g
        pooled = g.op("GlobalAveragePool", [self.t])
        hidden = max(2, self.c // 2)
        gate = g.op("Sigmoid", [g.conv(g.op("Relu", [g.conv(pooled, self.c, hidden, k=1)]), hidden, self.c, k=1)])
        self.t = g.op("Mul", [self.t, gate])

    def slice(self):
        if self.c < 3:
            return self.plain()
        start = self.draw(st.integers(0, self.c - 2))
        end = self.draw(st.integers(start + 1, self.c))
        g = self.g
        part = g.op("Slice", [self.t, g.const(np.array([start])), g.const(np.array([end])), g.const(np.array([1]))])
        cout = self.channels()
        self.t = g.op("Add", [self.conv(part, end - start, cout), self.conv(self.t, self.c, cout)])
        self.c = cout

    def norm(self):
        g = self.g
        kind = self.draw(st.sampled_from(["InstanceNormalization", "GroupNormalization"]))
        if kind == "GroupNormalization":
            groups = self.draw(st.sampled_from([d for d in (1, 2, 3) if self.c % d == 0]))
            self.t = g.op(kind, [self.t, g.weight(self.c, low=0.5), g.weight(self.c)], num_groups=groups)
        else:
            self.t = g.op(kind, [self.t, g.weight(self.c, low=0.5), g.weight(self.c)])
        self.t = self.act(self.t)

    def linear(self):
        """Pool to a vector, Gemm, and back to a 1x1 map: a classifier-style bottleneck."""
        g = self.g
        vector = g.op("Flatten", [g.op("GlobalAveragePool", [self.t])], axis=1)
        cout = self.channels()
        hidden = self.act(g.op("Gemm", [vector, g.weight(cout, self.c), g.weight(cout)], transB=1))
        self.t = g.op("Reshape", [hidden, g.const(np.array([1, cout, 1, 1]))])
        self.c, self.side = cout, 1

    def pool(self):
        if self.side >= 4:
            op = self.draw(st.sampled_from(["MaxPool", "AveragePool"]))
            self.t = self.g.op(op, [self.t], kernel_shape=[2, 2], strides=[2, 2])
            self.side //= 2

    def head(self):
        g = self.g
        if self.draw(st.booleans()):
            flat = g.op("Flatten", [self.t], axis=1)
            features = self.c * self.side * self.side
            g.output(g.op("Gemm", [flat, g.weight(5, features), g.weight(5)], transB=1))
        else:
            g.output(g.conv(self.t, self.c, 2, k=1))


BLOCKS = [
    "plain",
    "grouped",
    "depthwise",
    "residual",
    "concat",
    "split",
    "shuffle",
    "pixel",
    "channels_last",
    "se",
    "slice",
    "pool",
    "norm",
    "linear",
]


@st.composite
def networks(draw):
    net = Net(draw)
    net.plain()
    for name in draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6)):
        getattr(net, name)()
    net.head()
    return net.g.build()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(model=networks(), ratio=st.sampled_from([0.25, 0.5, 0.75]), global_rank=st.booleans())
def test_random_network_prunes_exactly(model, ratio, global_rank):
    # exact counts: every prunable group loses units, whatever this machine's kernels prefer
    result = spa.prune(model, ratio=ratio, global_rank=global_rank, criterion="l1", round_to=1)
    validation = result.report.validation
    assert validation.ok, validation.problems
    if not global_rank:  # a global ranking may leave a group whole
        assert result.report.groups_pruned == result.report.groups_prunable
    if result.report.groups_pruned:
        assert validation.soft_equal is True
        assert result.report.params_after < result.report.params_before
