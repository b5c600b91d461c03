"""The graph modality: safe decoding of graph.npz / graph.json / smi members, and the GNN tower."""

from __future__ import annotations

import io
import itertools
import json
import os
import sys
import zipfile

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from tessera.config import from_dict
from tessera.data import BadSample, SampleStats, SourceConfig, eval_batches, to_device
from tessera.data.graph import MAX_GRAPH_ELEMENTS, Graph
from tessera.data.make_shards import write_shards
from tessera.modalities import decoder
from tessera.models import ConfigError, ModelConfig, build_model, load_model, save_model
from tessera.models.graph import GraphEncoder, GraphEncoderConfig

DECODER = decoder("graph")
TEXT_TOWER = {
    "encoder": "open_clip_text",
    "model": "ViT-B-32",
    "overrides": {"context_length": 16, "width": 64, "heads": 2, "layers": 1},
}


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def json_bytes(**fields) -> bytes:
    return json.dumps(fields).encode()


def decode(suffix: str, raw: bytes):
    return DECODER.decode({"__key__": "k", suffix: raw})


def reason(suffix: str, raw: bytes) -> str:
    with pytest.raises(BadSample) as info:
        decode(suffix, raw)
    return info.value.reason


RING = np.array([[0, 1, 2, 1, 2, 0], [1, 2, 0, 0, 1, 2]])  # a triangle, both directions


# -- decoding -------------------------------------------------------------------------------------------


def test_npz_and_json_decode_to_the_same_data():
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    attr = np.ones((6, 2), dtype=np.float16)
    a = decode("graph.npz", npz_bytes(x=x, edge_index=RING.astype(np.int32), edge_attr=attr))
    b = decode("graph.json", json_bytes(x=x.tolist(), edge_index=RING.tolist(), edge_attr=attr.tolist()))
    for g in (a, b):
        assert isinstance(g, Graph) and g.num_nodes == 3 and g.num_edges == 6
        assert g.x.dtype == torch.float32 and g.edge_attr.dtype == torch.float32
        assert g.edge_index.dtype == torch.int64
        assert torch.equal(g.x, torch.tensor(x, dtype=torch.float32))
        assert torch.equal(g.edge_index, torch.tensor(RING))
    # integer (categorical) features stay integer; edge_attr is optional; isolated nodes are fine
    c = decode(
        "graph.npz",
        npz_bytes(x=np.array([[1, 2], [3, 4]], dtype=np.uint8), edge_index=np.zeros((2, 0), dtype=np.int64)),
    )
    assert c.x.dtype == torch.int64 and c.edge_attr is None and c.num_edges == 0
    d = decode("graph.json", json_bytes(x=[[0.5]], edge_index=[[], []], edge_attr=[]))
    assert d.num_nodes == 1 and d.edge_index.shape == (2, 0) and d.edge_attr is None


class Payload:
    """Unpickling this creates a directory: the side effect an object array could smuggle in."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_object_arrays_are_rejected_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    raw = npz_bytes(x=np.array([Payload(str(marker))], dtype=object), edge_index=np.zeros((2, 0), dtype=np.int64))
    assert reason("graph.npz", raw) == "undecodable_graph"
    assert not marker.exists()
    # the payload is live: loading with pickle allowed would have run it
    np.load(io.BytesIO(raw), allow_pickle=True)["x"]
    assert marker.exists()


def _npz_with_header(shape: tuple[int, ...]) -> bytes:
    """An .npz whose `x` header claims `shape` but holds almost no data (a decompression-bomb shape)."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": shape})
    member.write(b"\0" * 16)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", member.getvalue())
        zf.writestr("edge_index.npy", _npy(np.zeros((2, 0), dtype=np.int64)))
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


X3 = np.ones((3, 2), dtype=np.float32)


@pytest.mark.parametrize(
    "suffix, raw, expected",
    [
        ("graph.npz", npz_bytes(x=X3, edge_index=np.array([[0, 1], [1, 3]])), "invalid_graph"),  # 3 >= N
        ("graph.npz", npz_bytes(x=X3, edge_index=np.array([[0, -1], [1, 2]])), "invalid_graph"),  # negative
        ("graph.npz", npz_bytes(x=X3, edge_index=np.zeros((3, 2), dtype=int)), "invalid_graph"),  # 3 rows
        ("graph.npz", npz_bytes(x=np.ones(3, dtype=np.float32), edge_index=RING), "invalid_graph"),  # x is 1-D
        ("graph.npz", npz_bytes(x=X3, edge_index=RING, edge_attr=np.ones((5, 2))), "invalid_graph"),  # 5 != E
        ("graph.npz", npz_bytes(x=np.array([[1.0], [np.nan], [0.0]]), edge_index=RING), "invalid_graph"),
        ("graph.npz", npz_bytes(x=X3, edge_index=RING, edge_attr=np.full((6, 1), np.inf)), "invalid_graph"),
        ("graph.npz", npz_bytes(x=np.array([[1e300]]), edge_index=np.zeros((2, 0), dtype=int)), "invalid_graph"),
        (
            "graph.npz",
            npz_bytes(x=np.zeros((0, 4), dtype=np.float32), edge_index=np.zeros((2, 0), dtype=int)),
            "empty_graph",
        ),
        ("graph.npz", npz_bytes(edge_index=RING), "undecodable_graph"),  # no x
        ("graph.npz", npz_bytes(x=X3, edge_index=RING.astype(np.float32)), "undecodable_graph"),  # float indices
        ("graph.npz", npz_bytes(x=np.array([["a"], ["b"], ["c"]]), edge_index=RING), "undecodable_graph"),
        ("graph.npz", b"PK\x03\x04 not really a zip", "undecodable_graph"),
        ("graph.npz", _npy(X3), "undecodable_graph"),  # a bare .npy is not an archive
        ("graph.npz", _npz_with_header((MAX_GRAPH_ELEMENTS + 1, 1)), "graph_too_large"),
        ("graph.json", json_bytes(x=[], edge_index=[[], []]), "empty_graph"),
        ("graph.json", json_bytes(x=[[1.0], [2.0]], edge_index=[[0, 1], [1, 2]]), "invalid_graph"),
        ("graph.json", json_bytes(x=[[1.0], [2.0, 3.0]], edge_index=[[0], [1]]), "invalid_graph"),  # ragged
        ("graph.json", json_bytes(x=[[1.0], [None]], edge_index=[[0], [1]]), "undecodable_graph"),
        ("graph.json", json_bytes(x=[["a"]], edge_index=[[0], [0]]), "undecodable_graph"),
        ("graph.json", json_bytes(edge_index=[[0], [0]]), "undecodable_graph"),
        ("graph.json", b"[1, 2]", "undecodable_graph"),
        ("graph.json", b"{not json", "undecodable_graph"),
    ],
)
def test_bad_graphs_are_counted_by_reason(suffix, raw, expected):
    assert reason(suffix, raw) == expected


def test_smiles_become_molecular_graphs():
    from rdkit import Chem

    for smiles in ("CCO", "c1ccccc1O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "[Na+].[Cl-]"):
        g = decode("smi", f"{smiles}\tsome name\n".encode())
        mol = Chem.MolFromSmiles(smiles)
        assert g.num_nodes == mol.GetNumHeavyAtoms()
        assert g.x.dtype == torch.int64 and g.x.shape[1] == 9
        assert g.edge_attr.dtype == torch.int64 and g.edge_attr.shape == (2 * mol.GetNumBonds(), 3)
        assert g.edge_index.shape == (2, 2 * mol.GetNumBonds())
    assert reason("smi", b"C1CC((") == "bad_smiles"
    assert reason("smi", b"   \n") == "bad_smiles"
    assert reason("smi", b"\xff\xfe") == "bad_smiles"


def test_smiles_without_rdkit_is_a_counted_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "rdkit", None)  # makes `import rdkit` raise ImportError
    assert reason("smi", b"CCO") == "no_rdkit"


# -- through real shards --------------------------------------------------------------------------------


def test_graphs_come_through_tar_shards(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    ring = np.array([[0, 1, 2, 3], [1, 2, 3, 0]])
    good = {
        "a": {"graph.npz": npz_bytes(x=x, edge_index=ring)},
        "b": {"graph.json": json_bytes(x=x[:2].tolist(), edge_index=[[0], [1]])},
        "c": {"graph.npz": npz_bytes(x=x, edge_index=ring + 1)},  # edge to node 4 of 4: bad
        "d": {"graph.json": b"{}"},
        "e": {"graph.npz": npz_bytes(x=x[:1], edge_index=np.zeros((2, 0), dtype=int))},
    }
    write_shards(((k, {**v, "txt": f"graph {k}".encode()}) for k, v in good.items()), tmp_path, "g", 3)
    model = build_model(
        from_dict(
            ModelConfig,
            {
                "embed_dim": 16,
                "towers": {
                    "graph": {"encoder": "gnn", "arch": "gin", "in_dim": 3, "hidden_dim": 16, "layers": 2},
                    "text": TEXT_TOWER,
                },
            },
            "model",
        )
    ).eval()
    stats = SampleStats()
    src = [SourceConfig(str(tmp_path / "g-{000000..000001}.tar"))]
    batches = list(
        eval_batches(src, model.transforms(False), model.collators(), model.modalities, 2, num_workers=1, stats=stats)
    )
    assert [b["__key__"] for b in batches] == [["a", "b"], ["e"]]
    assert dict(stats.skipped) == {"invalid_graph": 1, "undecodable_graph": 1}
    graphs = batches[0]["graph"]
    assert isinstance(graphs, Batch) and graphs.num_graphs == 2
    assert torch.equal(graphs.x[:4], torch.from_numpy(x))
    with torch.no_grad():
        assert model(to_device(batches[0], "cpu"))["features"]["graph"].shape == (2, 16)


# -- the encoder ----------------------------------------------------------------------------------------


def random_graph(n: int, gen: torch.Generator, f: int = 5, fe: int = 3) -> Data:
    edge_index = torch.randint(0, n, (2, 2 * n), generator=gen)
    return Data(
        x=torch.randn(n, f, generator=gen),
        edge_index=edge_index,
        edge_attr=torch.randn(edge_index.shape[1], fe, generator=gen),
    )


def float_encoder(**kw) -> GraphEncoder:
    cfg = {"in_dim": 5, "edge_dim": 3, "hidden_dim": 16, "layers": 2, "heads": 2, **kw}
    return GraphEncoder(GraphEncoderConfig(**cfg), embed_dim=8)


def test_collate_offsets_edge_indices():
    gen = torch.Generator().manual_seed(0)
    enc = float_encoder(arch="gine")
    graphs = [random_graph(n, gen) for n in (2, 3, 4)]
    batch = enc.collate([enc.transform(True)(g) for g in graphs])
    assert float_encoder(arch="gin").transform(True)(graphs[0]).edge_attr is None  # gin does not read them
    assert batch.num_graphs == 3 and batch.x.shape == (9, 5) and batch.edge_attr.shape == (18, 3)
    assert batch.batch.tolist() == [0] * 2 + [1] * 3 + [2] * 4
    assert torch.equal(batch.edge_index[:, 4:10], graphs[1].edge_index + 2)


@pytest.mark.parametrize(
    "arch, pooling", itertools.product(["gin", "gine", "gat", "gps"], ["mean", "sum", "attention"])
)
def test_every_arch_and_pooling_trains(arch, pooling):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    enc = float_encoder(arch=arch, pooling=pooling, rw_steps=3 if arch == "gps" else 0, output_dim=12)
    transform = enc.transform(True)
    batch = enc.collate([transform(random_graph(n, gen)) for n in (3, 6, 4)])
    out = enc(batch)
    assert out.shape == (3, 12) and torch.isfinite(out).all()
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    assert enc.node_encoder.weight.grad.abs().sum() > 0
    if arch != "gin":
        assert enc.edge_encoder.weight.grad.abs().sum() > 0
    else:
        assert enc.edge_encoder is None


@pytest.mark.parametrize("arch", ["gin", "gine", "gat", "gps"])
def test_smiles_graphs_feed_the_ogb_encoder(arch):
    torch.manual_seed(0)
    enc = GraphEncoder(GraphEncoderConfig(arch=arch, node_features="ogb", hidden_dim=16, layers=2, heads=2), 8)
    batch = enc.collate([enc.transform(True)(decode("smi", s)) for s in (b"CCO", b"c1ccccc1", b"[Na+].[Cl-]")])
    out = enc(batch)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert enc.node_encoder.tables[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch, pooling", [("gin", "sum"), ("gat", "attention"), ("gps", "mean"), ("gine", "mean")])
def test_pooled_embedding_is_invariant_to_node_order(arch, pooling):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    enc = float_encoder(arch=arch, pooling=pooling, rw_steps=4).eval()
    transform = enc.transform(False)
    g = random_graph(7, gen)
    perm = torch.randperm(7, generator=gen)  # new node i is old node perm[i]
    inverse = torch.argsort(perm)
    relabelled = Data(x=g.x[perm], edge_index=inverse[g.edge_index], edge_attr=g.edge_attr)
    other = random_graph(4, gen)
    with torch.no_grad():
        a = enc(enc.collate([transform(g), transform(other)]))
        b = enc(enc.collate([transform(relabelled), transform(other)]))
    assert torch.allclose(a, b, atol=1e-5)


def test_bf16_forward_and_to_device_keeps_indices_integer():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    enc = float_encoder(arch="gps", pooling="attention", rw_steps=3)
    batch = enc.collate([enc.transform(True)(random_graph(n, gen)) for n in (3, 5)])
    moved = to_device(batch, "cpu", torch.bfloat16)
    assert moved.x.dtype == moved.edge_attr.dtype == moved.random_walk_pe.dtype == torch.bfloat16
    assert moved.edge_index.dtype == moved.batch.dtype == torch.int64
    assert batch.x.dtype == torch.float32  # the caller's batch is left as it was
    out = enc.to(torch.bfloat16)(moved)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    grad = enc.node_encoder.weight.grad  # gradients flow back through every layer in bf16
    assert grad is not None and grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all() and grad.any()


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    enc = float_encoder(arch="gine")
    batch = enc.collate([enc.transform(True)(random_graph(n, gen)) for n in (3, 5)])
    grads = []
    for enable in (False, True):
        enc.zero_grad()
        enc.set_grad_checkpointing(enable)
        (enc(batch) ** 2).sum().backward()
        grads.append(enc.node_encoder.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_config_and_transform_errors_name_the_key_to_fix():
    with pytest.raises(ConfigError, match="gine needs edge features: set edge_dim"):
        GraphEncoderConfig(arch="gine", in_dim=4)
    with pytest.raises(ConfigError, match="needs in_dim"):
        GraphEncoderConfig()
    with pytest.raises(ConfigError, match="heads .3. must divide hidden_dim .16."):
        GraphEncoderConfig(arch="gat", in_dim=4, hidden_dim=16, heads=3)
    with pytest.raises(ConfigError, match="graph: .*remove in_dim"):
        from_dict(
            ModelConfig,
            {"towers": {"graph": {"encoder": "gnn", "node_features": "ogb", "in_dim": 9}, "text": TEXT_TOWER}},
            "model",
        )
    mol = decode("smi", b"CCO")
    with pytest.raises(ValueError, match="graph x has 9 integer columns: set node_features: ogb"):
        float_encoder().transform(False)(mol)
    with pytest.raises(ValueError, match="graph x has 5 float columns: set in_dim: 5"):
        float_encoder(in_dim=7).transform(False)(random_graph(3, torch.Generator()))
    with pytest.raises(ValueError, match="edge_attr has 3 float columns: set edge_dim: 3"):
        float_encoder(arch="gat", edge_dim=2).transform(False)(random_graph(3, torch.Generator()))
    ogb = GraphEncoder(GraphEncoderConfig(node_features="ogb", hidden_dim=16, layers=1), 8).transform(False)
    with pytest.raises(ValueError, match="set node_features: float and in_dim: 5"):
        ogb(random_graph(3, torch.Generator()))
    with pytest.raises(ValueError, match="column 0 holds values outside"):
        ogb(Data(x=torch.full((1, 9), 500), edge_index=torch.zeros(2, 0, dtype=torch.long)))


def test_model_with_a_graph_tower_exports_and_reloads(tmp_path):
    torch.manual_seed(0)
    cfg = from_dict(
        ModelConfig,
        {
            "embed_dim": 16,
            "towers": {
                "graph": {
                    "encoder": "gnn",
                    "arch": "gin",
                    "in_dim": 5,
                    "edge_dim": 3,
                    "hidden_dim": 16,
                    "layers": 2,
                    "pooling": "attention",
                    "rw_steps": 2,
                    "output_dim": 24,
                },
                "text": TEXT_TOWER,
            },
        },
        "model",
    )
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(5)
    transform = model.transforms(False)["graph"]
    graphs = model.collators()["graph"]([transform(random_graph(n, gen)) for n in (3, 4)])
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg.towers["graph"].params == cfg.towers["graph"].params
    with torch.no_grad():
        a, b = model.encode("graph", graphs), loaded.encode("graph", graphs)
    assert a.shape == (2, 16) and torch.equal(a, b)
