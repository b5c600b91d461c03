"""A graph encoder from torch-geometric layers: GIN, GINE, GATv2 or GraphGPS, pooled to one vector per graph.

Node features are either float columns (`node_features: float`, a Linear from `in_dim`) or the nine
categorical atom columns of `torch_geometric.utils.from_smiles` (`node_features: ogb`, embedded and
summed as OGB's AtomEncoder does; bonds likewise with the three bond columns), so SMILES shards work
as they are. A tiny CPU tower: `{encoder: gnn, arch: gin, in_dim: F, hidden_dim: 64, layers: 3}`.

Shape legend: N nodes in a batch, E edges, G graphs, H hidden_dim, F / Fe node / edge feature widths,
K random-walk steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GATv2Conv, GINConv, GINEConv, GPSConv
from torch_geometric.nn.aggr import AttentionalAggregation, MeanAggregation, SumAggregation
from torch_geometric.transforms import AddRandomWalkPE
from torch_geometric.utils.smiles import e_map, x_map

from tessera.config import require

from .encoder import Encoder

__all__ = ["GraphEncoderConfig", "GraphEncoder", "GraphTransform"]

# Vocabulary size of each categorical column, in from_smiles' column order.
OGB_ATOM_VOCAB = tuple(len(v) for v in x_map.values())  # 9 columns
OGB_BOND_VOCAB = tuple(len(v) for v in e_map.values())  # 3 columns
PE_ATTR = "random_walk_pe"


@dataclass
class GraphEncoderConfig:
    arch: Literal["gin", "gine", "gat", "gps"] = field(
        default="gin",
        metadata={
            "help": "gin: GIN (ignores edge features); gine: GIN with edge features; gat: "
            "GATv2; gps: GraphGPS (a GINE/GIN layer plus global attention)"
        },
    )
    node_features: Literal["float", "ogb"] = field(
        default="float",
        metadata={
            "help": "float: x is [N, in_dim] floats; ogb: x is the 9 categorical atom "
            "columns of from_smiles (.smi members), bonds the 3 bond columns"
        },
    )
    in_dim: int | None = field(default=None, metadata={"help": "columns of x (node_features: float only)"})
    edge_dim: int | None = field(
        default=None, metadata={"help": "columns of edge_attr (node_features: float); null: no edge features"}
    )
    hidden_dim: int = field(default=128, metadata={"help": "node embedding width"})
    layers: int = field(default=4, metadata={"help": "message-passing layers"})
    heads: int = field(default=4, metadata={"help": "attention heads (gat, gps); must divide hidden_dim"})
    dropout: float = field(default=0.0, metadata={"help": "dropout after each layer (and on attention)"})
    pooling: Literal["mean", "sum", "attention"] = field(
        default="mean", metadata={"help": "nodes -> graph: mean, sum, or attention (a learned gate per node)"}
    )
    rw_steps: int = field(
        default=0, metadata={"help": "random-walk positional encoding steps added to the node embedding; 0: none"}
    )
    output_dim: int | None = field(default=None, metadata={"help": "tower output width; default hidden_dim"})

    def __post_init__(self):
        if self.node_features == "float":
            require(
                self.in_dim is not None and self.in_dim > 0,
                "node_features: float needs in_dim, the number of columns of x (for SMILES graphs set "
                "node_features: ogb)",
            )
            require(
                self.edge_dim is None or self.edge_dim > 0, f"edge_dim must be positive or null, got {self.edge_dim}"
            )
        else:
            require(
                self.in_dim is None,
                "in_dim is for node_features: float; ogb embeds the 9 atom columns of from_smiles: remove in_dim",
            )
            require(
                self.edge_dim is None,
                "edge_dim is for node_features: float; ogb embeds the 3 bond columns of from_smiles: remove edge_dim",
            )
        require(
            self.arch != "gine" or self.uses_edges,
            "arch: gine needs edge features: set edge_dim (the columns of edge_attr), or use arch: gin",
        )
        require(self.hidden_dim > 0 and self.layers > 0, "hidden_dim and layers must be positive")
        require(
            self.heads > 0 and self.hidden_dim % self.heads == 0,
            f"heads ({self.heads}) must divide hidden_dim ({self.hidden_dim})",
        )
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        require(self.rw_steps >= 0, f"rw_steps must be >= 0, got {self.rw_steps}")
        require(self.output_dim is None or self.output_dim > 0, "output_dim must be positive or null")

    @property
    def uses_edges(self) -> bool:
        """Whether the layers read edge features (GIN never does)."""
        return self.arch != "gin" and (self.node_features == "ogb" or self.edge_dim is not None)


class CategoricalEmbedding(nn.Module):
    """Integer columns [*, C] -> the sum of one embedding per column [*, H] (OGB's Atom/BondEncoder)."""

    def __init__(self, vocab_sizes: tuple[int, ...], dim: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in vocab_sizes)
        for table in self.tables:
            nn.init.xavier_uniform_(table.weight)

    def forward(self, x_NC: torch.Tensor) -> torch.Tensor:
        return sum(table(x_NC[:, i]) for i, table in enumerate(self.tables))


def _check_columns(
    t: torch.Tensor, name: str, cfg_key: str, cfg: GraphEncoderConfig, width: int | None, vocab: tuple[int, ...]
) -> torch.Tensor:
    """Check one feature tensor against the config; return it as float32 or int64."""
    cols = t.shape[1]
    if cfg.node_features == "float":
        if not t.is_floating_point():
            raise ValueError(
                f"graph {name} has {cols} integer columns: set node_features: ogb for SMILES-style "
                f"categorical features, or store {name} as floats"
            )
        if cols != width:
            raise ValueError(f"graph {name} has {cols} float columns: set {cfg_key}: {cols}")
        return t.float()
    if t.is_floating_point():
        raise ValueError(f"graph {name} has {cols} float columns: set node_features: float and {cfg_key}: {cols}")
    if cols != len(vocab):
        raise ValueError(
            f"graph {name} has {cols} integer columns, but node_features: ogb reads the {len(vocab)} "
            f"columns of torch_geometric.utils.from_smiles: set node_features: float"
        )
    t = t.long()
    if t.numel() and ((t < 0).any() or (t >= torch.tensor(vocab)).any()):
        bad = int(((t < 0) | (t >= torch.tensor(vocab))).any(0).nonzero()[0])
        raise ValueError(
            f"graph {name} column {bad} holds values outside [0, {vocab[bad]}), the vocabulary of "
            "torch_geometric.utils.from_smiles (node_features: ogb)"
        )
    return t


class GraphTransform:
    """A decoded graph (anything with tensors `x`, `edge_index` and `edge_attr` or None: the `Graph` that
    `tessera.data` decodes, or a PyG `Data`) -> the model input `Data` (x, edge_index, edge features if used,
    random-walk PE).

    Checks the feature widths and dtypes against the config (a mismatch is a ValueError naming the key
    to set), makes float features float32, and drops what the encoder does not read. Picklable.
    """

    def __init__(self, cfg: GraphEncoderConfig):
        self.cfg = cfg
        self.add_pe = AddRandomWalkPE(cfg.rw_steps, attr_name=PE_ATTR) if cfg.rw_steps else None

    def __call__(self, graph: Any) -> Data:
        cfg = self.cfg
        if getattr(graph, "x", None) is None or graph.x.dim() != 2:
            raise ValueError("a graph sample needs x [N, F]")
        x = _check_columns(graph.x, "x", "in_dim", cfg, cfg.in_dim, OGB_ATOM_VOCAB)
        edge_index_2E = graph.edge_index.long()
        out = Data(x=x, edge_index=edge_index_2E)
        if cfg.uses_edges:
            edge_attr = getattr(graph, "edge_attr", None)
            if edge_attr is None:
                if edge_index_2E.shape[1]:
                    raise ValueError(
                        f"graph has edges but no edge_attr, and arch: {cfg.arch} reads edge "
                        "features: set edge_dim: null (and arch: gin instead of gine)"
                    )
                width = cfg.edge_dim if cfg.node_features == "float" else len(OGB_BOND_VOCAB)
                edge_attr = torch.zeros(0, width, dtype=torch.float32 if cfg.node_features == "float" else torch.long)
            out.edge_attr = _check_columns(edge_attr, "edge_attr", "edge_dim", cfg, cfg.edge_dim, OGB_BOND_VOCAB)
        if self.add_pe is not None:
            out = self.add_pe(out)
        return out


class GraphBlock(nn.Module):
    """One layer. gin/gine/gat: h + dropout(relu(norm(conv(h)))); gps: GPSConv, with its own residuals."""

    def __init__(self, cfg: GraphEncoderConfig):
        super().__init__()
        hidden, edge_dim = cfg.hidden_dim, (cfg.hidden_dim if cfg.uses_edges else None)
        self.arch, self.dropout = cfg.arch, cfg.dropout

        def mlp() -> nn.Sequential:
            return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))

        local = GINEConv(mlp(), train_eps=True) if cfg.uses_edges else GINConv(mlp(), train_eps=True)
        if cfg.arch == "gat":
            self.conv = GATv2Conv(hidden, hidden // cfg.heads, heads=cfg.heads, edge_dim=edge_dim, dropout=cfg.dropout)
        elif cfg.arch == "gps":
            self.conv = GPSConv(
                hidden,
                local,
                heads=cfg.heads,
                dropout=cfg.dropout,
                norm="layer_norm",
                norm_kwargs={"mode": "node"},
                attn_kwargs={"dropout": cfg.dropout},
            )
        else:
            self.conv = local
        self.norm = nn.LayerNorm(hidden) if cfg.arch != "gps" else None

    def forward(
        self, h_NH: torch.Tensor, edge_index_2E: torch.Tensor, e_EH: torch.Tensor | None, batch_N: torch.Tensor
    ) -> torch.Tensor:
        edge_kw = {} if e_EH is None else {"edge_attr": e_EH}
        if self.arch == "gps":
            return self.conv(h_NH, edge_index_2E, batch_N, **edge_kw)
        out_NH = self.norm(self.conv(h_NH, edge_index_2E, **edge_kw))
        return h_NH + F.dropout(F.relu(out_NH), p=self.dropout, training=self.training)


class GraphEncoder(Encoder):
    """A PyG `Batch` of G graphs -> (G, output_dim) pooled node embeddings. LoRA adapts every Linear (the default)."""

    config_cls = GraphEncoderConfig

    def __init__(self, cfg: GraphEncoderConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_dim
        self.output_dim = cfg.output_dim or hidden
        if cfg.node_features == "float":
            self.node_encoder: nn.Module = nn.Linear(cfg.in_dim, hidden)
            self.edge_encoder = nn.Linear(cfg.edge_dim, hidden) if cfg.uses_edges else None
        else:
            self.node_encoder = CategoricalEmbedding(OGB_ATOM_VOCAB, hidden)
            self.edge_encoder = CategoricalEmbedding(OGB_BOND_VOCAB, hidden) if cfg.uses_edges else None
        self.pe_encoder = nn.Linear(cfg.rw_steps, hidden) if cfg.rw_steps else None
        self.blocks = nn.ModuleList(GraphBlock(cfg) for _ in range(cfg.layers))
        if cfg.pooling == "attention":
            gate = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            self.pool: nn.Module = AttentionalAggregation(gate)
        else:
            self.pool = MeanAggregation() if cfg.pooling == "mean" else SumAggregation()
        self.proj = nn.Linear(hidden, self.output_dim) if self.output_dim != hidden else nn.Identity()
        self.grad_checkpointing = False

    def _embed(self, encoder: nn.Module, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():  # float features follow the weights' dtype (bf16 models, fp32 inputs)
            t = t.to(encoder.weight.dtype)
        return encoder(t)

    def forward(self, graphs: Batch) -> torch.Tensor:  # (G, output_dim)
        h_NH = self._embed(self.node_encoder, graphs.x)
        if self.pe_encoder is not None:
            h_NH = h_NH + self._embed(self.pe_encoder, graphs[PE_ATTR])
        e_EH = self._embed(self.edge_encoder, graphs.edge_attr) if self.edge_encoder is not None else None
        batch_N = getattr(graphs, "batch", None)
        if batch_N is None:  # a single Data
            batch_N = torch.zeros(h_NH.shape[0], dtype=torch.long, device=h_NH.device)
        num_graphs = int(getattr(graphs, "num_graphs", 1))
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h_NH = checkpoint(block, h_NH, graphs.edge_index, e_EH, batch_N, use_reentrant=False)
            else:
                h_NH = block(h_NH, graphs.edge_index, e_EH, batch_N)
        return self.proj(self.pool(h_NH, batch_N, dim_size=num_graphs))

    def transform(self, is_train: bool) -> GraphTransform:
        return GraphTransform(self.cfg)

    @staticmethod
    def collate(items: list[Any]) -> Batch:
        return Batch.from_data_list(items)

    @staticmethod
    def split(inputs: Batch, start: int, stop: int) -> Batch:
        return Batch.from_data_list(inputs.index_select(range(start, stop)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
