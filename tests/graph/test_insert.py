"""insert_after: a module called after one call inside a forward, the owner keeping its class."""

import copy

import pytest
import torch
import torch.nn as nn

from amct_torch.graph import capture
from amct_torch.graph.insert import InsertError, has_generated_forward, insert_after


class Double(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("factor", torch.tensor(2.0))

    def forward(self, x):
        return x * self.factor


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.act(self.lin(x)) + x
        return self.act(y)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x))


def keys(graph, scope):
    return {n.local: n for n in graph.nodes if n.scope == scope}


def test_capture_names_each_call_in_its_owner():
    g = capture(Net())
    local = {(n.scope, n.local[1] if isinstance(n.local[1], str) else n.local[1].__name__, n.local[2])
             for n in g.nodes if n.local}
    assert {("block", "lin", 0), ("block", "act", 0), ("block", "add", 0), ("block", "act", 1), ("", "head", 0)} == local


def test_inserted_module_runs_after_the_chosen_call_only():
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(3, 4)
    g = capture(net)
    add = next(n for n in g.nodes if n.kind == "function" and n.target == "add")
    second_act = next(n for n in g.nodes if n.local == ("call_module", "act", 1))
    ref = copy.deepcopy(net)
    paths = insert_after(net, "block", [(add.local, "add_double", Double()), (second_act.local, "act_1_double", Double())])
    assert paths == ["block.add_double", "block.act_1_double"]
    assert isinstance(net.block, Block) and has_generated_forward(net.block)
    with torch.no_grad():
        b = ref.block
        expected = ref.head(b.act(2 * (b.act(b.lin(x)) + x)) * 2)
        assert torch.allclose(net(x), expected)
    assert {"block.add_double.factor", "block.act_1_double.factor"} <= set(net.state_dict())
    clone = copy.deepcopy(net)  # the regenerated forward follows the copy
    with torch.no_grad():
        clone.block.add_double.factor.fill_(3.0)
        assert not torch.allclose(clone(x), net(x))


def test_taken_names_get_a_suffix():
    net = Net()
    g = capture(net)
    first = next(n for n in g.nodes if n.local == ("call_module", "act", 0))
    assert insert_after(net, "block", [(first.local, "lin", Double())]) == ["block.lin_1"]


def test_untraceable_owner_and_missing_call_are_errors_and_change_nothing():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else x

    net = Branchy()
    with pytest.raises(InsertError, match="Branchy: its forward cannot be traced by torch.fx"):
        insert_after(net, "", [(("call_module", "lin", 0), "q", Double())])
    assert not has_generated_forward(net) and not hasattr(net, "q")
    net2 = Net()
    with pytest.raises(InsertError, match=r"block: calls \[\('call_module', 'act', 5\)\] not found"):
        insert_after(net2, "block", [(("call_module", "act", 5), "q", Double())])
    assert not hasattr(net2.block, "q")


def test_a_model_with_a_generated_forward_pickles_and_deep_copies():
    import io

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(3, 4)
    g = capture(net)
    add = next(n for n in g.nodes if n.kind == "function" and n.target == "add")
    insert_after(net, "block", [(add.local, "add_double", Double())])
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
        loaded.block.add_double.factor.fill_(5.0)  # the loaded forward is bound to the loaded module
        assert not torch.equal(loaded(x), net(x))
        assert torch.equal(copy.deepcopy(net)(x), net(x))
