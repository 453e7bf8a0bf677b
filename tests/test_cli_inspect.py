"""The command line (inspect, demo, error handling), input/model specs, and the graph picture."""
import subprocess
import sys
import textwrap

import pytest
import torch

from fxwormhole import zoo
from fxwormhole.analysis import candidate_spans, layer_table, main_path
from fxwormhole.capture import capture
from fxwormhole.cli import COMMANDS, main
from fxwormhole.cli.specs import load_model, parse_input_spec
from fxwormhole.drawing import build_display_graph, draw_graph
from fxwormhole.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def user_file(tmp_path):
    f = tmp_path / "my_models.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, width=5):
                super().__init__()
                self.a = nn.Linear(3, width)
                self.b = nn.Linear(width, width)
                self.c = nn.Linear(width, 2)
            def forward(self, x):
                return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

        def make_net(width=4):
            return Net(width=width)

        def not_a_model():
            return 3
    """))
    return f


def _error_line(capsys):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fxwormhole: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_inspect_prints_front_end_table_and_spans(user_file, capsys):
    rc = main(["inspect", f"{user_file}:Net", "--input", "4x3", "--kwargs", '{"width": 7}'])
    out = capsys.readouterr().out
    assert rc == 0
    assert "front end:  symbolic_trace" in out
    table = out[out.index("#  layer"):]
    rows = [line.split() for line in table.splitlines()[2:5]]
    assert rows == [["0", "a", "a", "linear", "relu", "4x3", "4x7", "0"],
                    ["1", "b", "b", "linear", "relu", "4x7", "4x7", "1"],
                    ["2", "c", "c", "linear", "-", "4x7", "4x2", "2", "(out)"]]
    assert "1. b -> a" in out


def test_inspect_factory_export_and_picture(user_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pic = tmp_path / "g.png"
    rc = main(["inspect", f"{user_file}:make_net", "-i", "2x3", "--front-end", "export", "--picture", str(pic)])
    out = capsys.readouterr().out
    assert rc == 0 and "front end:  export" in out and "4x4" not in out.split("#  layer")[0]
    assert pic.read_bytes()[:8] == PNG_MAGIC and pic.stat().st_size > 10_000
    svg = tmp_path / "g.svg"
    assert main(["inspect", "fxwormhole.zoo:TwoInTwoOut", "-i", "2x6", "-i", "2x5", "--picture", str(svg)]) == 0
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "trunk2" in text and "enc_a" in text


def test_inspect_reports_fallback_for_shape_loop(capsys):
    assert main(["inspect", "fxwormhole.zoo:SeqLenLoop", "-i", "2x4x6"]) == 0
    out = capsys.readouterr().out
    assert "front end:  export" in out and "(symbolic_trace failed:" in out
    assert "candidate spans: none" in out


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "fxwormhole.zoo.MLP", "-i", "2x8"], "expected 'path/to/file.py:Name'"),
    (["inspect", "no_such_pkg_xyz:Net", "-i", "2x8"], "cannot import module 'no_such_pkg_xyz'"),
    (["inspect", "missing/file.py:Net", "-i", "2x8"], "does not exist"),
    (["inspect", "fxwormhole.zoo:Nope", "-i", "2x8"], "nn.Module classes there: CNN"),
    (["inspect", "fxwormhole.zoo:MLP", "-i", "2x8", "--kwargs", "{bad"], "not valid JSON"),
    (["inspect", "fxwormhole.zoo:MLP", "-i", "2x8", "--kwargs", "[1]"], "JSON list"),
    (["inspect", "fxwormhole.zoo:MLP", "-i", "2x8", "--kwargs", '{"nope": 1}'], "could not be built"),
    (["inspect", "fxwormhole.zoo:MLP", "-i", "2by8"], "--input '2by8'"),
    (["inspect", "fxwormhole.zoo:MLP", "-i", "float32:2x8:5"], "integer dtypes only"),
    (["inspect", "fxwormhole.zoo:MLP"], "required: --input"),
    (["inspect", "fxwormhole.zoo:MLP", "-i", "2x8", "--front-end", "jit"], "invalid choice: 'jit'"),
    (["inspect", "fxwormhole.zoo:MLP", "-i", "2x8", "--picture", "g.jpg"], "ending in .png or .svg"),
    (["inspect", "fxwormhole.zoo:DataDependentBreak", "-i", "2x4x6"], "h.norm() < 1e-3"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
])
def test_bad_arguments_give_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    line = _error_line(capsys)
    assert needle in line


def test_factory_returning_non_module(user_file, capsys):
    assert main(["inspect", f"{user_file}:not_a_model", "-i", "2x3"]) == 2
    assert "returned a int, not an nn.Module" in _error_line(capsys)


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["inspect", "fxwormhole.zoo:MLP", "-i", "2x8", "--picture", str(tmp_path / "g.png")]) == 2
    assert "pip install fxwormhole[plots]" in _error_line(capsys)


def test_demo_command_writes_the_rewritten_graph(tmp_path):
    # The demo itself is tested in test_demo.py; here: the command runs and draws the graph.
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    assert main(["demo", "--quick", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "graph.png").read_bytes()[:8] == PNG_MAGIC


def test_real_process_module_entry_point(tmp_path):
    env_py = sys.executable
    ok = subprocess.run([env_py, "-m", "fxwormhole.cli", "inspect", "fxwormhole.zoo:CNN", "-i", "2x1x12x12"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "conv2d" in ok.stdout and "1. fc -> conv1" in ok.stdout


def test_commands_registry():
    assert COMMANDS[:2] == ["inspect_cmd", "demo_cmd"]


# --- specs -------------------------------------------------------------------------------------

def test_parse_input_spec():
    t = parse_input_spec("2x3x4")
    assert t.dtype == torch.float32 and t.shape == (2, 3, 4) and t.std() > 0
    t = parse_input_spec("int64:8x20:100")
    assert t.dtype == torch.int64 and t.shape == (8, 20) and 0 <= int(t.min()) and int(t.max()) < 100
    assert int(parse_input_spec("int32:50").max()) <= 1
    assert parse_input_spec("bool:5").dtype == torch.bool
    assert parse_input_spec("float64:7").dtype == torch.float64
    for bad in ["", "2x", "x2", "2x0", "float32", "int64:2:0", "complex:2", "2x3:4"]:
        with pytest.raises(ConfigError, match="expected|>= 1"):
            parse_input_spec(bad)


def test_input_specs_too_large_for_memory_are_refused_before_or_at_allocation(monkeypatch):
    from fxwormhole.cli import specs

    monkeypatch.setattr(specs, "available_memory", lambda: 10 * 2**20)
    with pytest.raises(ConfigError, match=r"needs 16.0 MiB, more than the 10.0 MiB of memory available; use a smaller"):
        parse_input_spec("float64:2048x1024")
    assert parse_input_spec("float64:1024x1024").shape == (1024, 1024)  # 8 MiB fits
    # where free memory is unknown, the allocator's refusal is the error
    monkeypatch.setattr(specs, "available_memory", lambda: None)
    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 16777216 bytes")

    monkeypatch.setattr(torch, "randn", refuse)
    with pytest.raises(ConfigError, match="allocating it failed .*can't allocate memory.*use a smaller example input"):
        parse_input_spec("float64:2048x1024")


def test_load_model_forms(user_file):
    m = load_model(f"{user_file}:Net", '{"width": 9}')
    assert m.b.weight.shape == (9, 9)
    assert isinstance(load_model("fxwormhole.zoo:CNN", '{"channels": 3}'), zoo.CNN)
    assert load_model(f"{user_file}:make_net").a.out_features == 4


# --- the picture -------------------------------------------------------------------------------

def test_display_graph_folds_transformer_and_keeps_main_column():
    m = zoo.TransformerStack().eval()
    gm = capture(m, m.example_inputs())
    layers = layer_table(gm)
    spans = candidate_spans(gm, layers)
    dg = build_display_graph(gm, layers=layers, spans=spans[:1])
    ids = set(dg.nodes)
    # attention calls folded into one box each, listing the layer hidden inside
    assert {"region:layers.0.self_attn", "region:layers.1.self_attn"} <= ids
    assert "out_proj: linear" in dg.nodes["region:layers.0.self_attn"].label
    assert len(dg.nodes) < len(gm.graph.nodes) / 2
    # every main-path node is drawn in column 0, top to bottom in graph order
    path = main_path(gm)
    boxes = [dg.box_of(n) for n in path]
    assert all(dg.nodes[b].column == 0 for b in boxes)
    ranks = [dg.nodes[b].rank for b in boxes]
    assert ranks == sorted(ranks)
    # feed-forward layers beside the path, with their activation
    ff = dg.nodes[next(l.node for l in layers if l.name == "layers.0.linear1")]
    assert ff.column > 0 and "+ relu" in ff.label
    # the best span goes from block 1's output to block 0's entry
    (src, dst, label) = dg.spans[0]
    assert src == dg.box_of(path[path.index("layer_norm_3")]) and dst == "region:layers.0.self_attn"
    assert label == "span 1"


def test_highlights_are_never_folded(tmp_path):
    pytest.importorskip("matplotlib")
    m = zoo.TransformerStack().eval()
    gm = capture(m, m.example_inputs())
    inner = next(n.name for n in gm.graph.nodes if n.name.startswith("scaled_dot_product_attention"))
    dg = build_display_graph(gm, highlights={inner: "fixed_point", "layers_0_linear1": "wormhole"})
    assert "region:layers.0.self_attn" not in dg.nodes  # the highlighted node keeps its block open
    assert dg.nodes[dg.box_of(inner)].highlight == "fixed_point"
    assert dg.nodes["layers_0_linear1"].highlight == "wormhole"
    out = draw_graph(gm, tmp_path / "h.svg", highlights={inner: "fixed_point"})
    assert "fixed_point" in out.read_text()


def test_chains_of_data_movement_fold():
    m = zoo.LSTMClassifier()
    gm = capture(m, m.example_inputs())
    dg = build_display_graph(gm)
    chains = [d for d in dg.nodes.values() if d.role == "chain"]
    assert len(chains) == 1 and chains[0].label.startswith("2 ops") and chains[0].on_main_path
