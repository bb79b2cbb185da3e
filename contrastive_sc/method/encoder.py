"""The MLP encoder: Linear layers with BatchNorm + ReLU between them and an L2-normalised output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import MaskedViews
from .rows import Rows, as_rows, collect

#: What a trained encoder hands on as the embedding. The loss is always computed on ``"output"``,
#: the L2-normalised last layer (the paper's embedding). ``"unnormalised"`` is that layer before
#: the normalisation, ``"hidden"`` the first hidden layer after BatchNorm + ReLU (SimCLR's
#: representation before its projection head). On the sphere the loss's uniformity spreads a large
#: cell type over as much room as a small one; before it, the sizes of the differences survive.
READOUTS = ("output", "unnormalised", "hidden")


class ContrastiveEncoder(nn.Module):
    """MLP ``n_inputs -> layers[0] -> ... -> layers[-1]``, output on the unit sphere.

    Parameters
    ----------
    n_inputs
        Number of input genes.
    layers
        Hidden and output sizes; the paper uses ``(200, 40, 60)``.
    batch_norm
        Put ``BatchNorm1d`` before each hidden ReLU (the paper does).
    readout
        What :meth:`forward` returns, one of :data:`READOUTS`; training sets ``"output"``.
    projection
        When > 0, the input first goes through a Linear layer to this many features (the
        ``input_projection`` of :class:`~contrastive_sc.method.config.EncoderConfig`, set to a PCA
        transform by :meth:`init_projection`); 0 (the paper) reads the genes directly.

    Notes
    -----
    ``forward(x, n_views)`` accepts several views stacked along the batch axis and normalises
    each view's batch on its own: the result equals ``n_views`` separate forward passes (as
    the original code ran them) while each Linear layer runs once on the stacked batch. In
    training, ``x`` may also be :class:`~contrastive_sc.method.augment.MaskedViews`, sparse views
    whose first Linear layer costs only their kept entries.
    """

    def __init__(self, n_inputs: int, layers: tuple[int, ...] = (200, 40, 60), batch_norm: bool = True,
                 readout: str = "output", projection: int = 0) -> None:
        super().__init__()
        # an input projection (0: none) is a Linear layer n_inputs -> projection before the MLP
        self.projection = nn.Linear(int(n_inputs), int(projection)) if projection else None
        sizes = [int(projection) or int(n_inputs), *map(int, layers)]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        hidden = sizes[1:-1]
        self.norms = nn.ModuleList(nn.BatchNorm1d(w) if batch_norm else nn.Identity() for w in hidden)
        self.n_inputs = int(n_inputs)
        self.batch_norm = bool(batch_norm)
        self._sizes = sizes
        self.readout = readout

    @property
    def init_args(self) -> dict:
        """The constructor arguments that rebuild this module (saved in its checkpoint)."""
        return {"n_inputs": self.n_inputs, "layers": self._sizes[1:], "batch_norm": self.batch_norm,
                "readout": self.readout, "projection": self.projection.out_features if self.projection else 0}

    @torch.no_grad()
    def init_projection(self, index: torch.Tensor, mean: torch.Tensor, components: torch.Tensor, *,
                        trainable: bool) -> None:
        """Make the input projection the PCA transform ``(x[:, index] - mean) @ components.T``.

        ``components`` is ``(k, g)`` for the ``g`` input columns ``index``; the other columns get
        zero weights (a trainable projection may learn them) and the centring is the bias. A
        projection that is not ``trainable`` keeps these values through training.
        """
        if self.projection is None:
            msg = "this encoder has no input projection; build it with projection=<components>"
            raise RuntimeError(msg)
        index = torch.as_tensor(index, dtype=torch.int64)
        components = torch.as_tensor(components, dtype=torch.float32)
        mean = torch.as_tensor(mean, dtype=torch.float32)
        if tuple(components.shape) != (self.projection.out_features, len(index)) or mean.shape != index.shape:
            msg = (f"the projection takes {self.projection.out_features} components of {len(index)} columns; got "
                   f"components {tuple(components.shape)} and mean {tuple(mean.shape)}")
            raise ValueError(msg)
        weight = torch.zeros_like(self.projection.weight)
        weight[:, index] = components
        self.projection.weight.copy_(weight)
        self.projection.bias.copy_(-(components @ mean))
        self.projection.requires_grad_(trainable)

    @property
    def first_layer(self) -> nn.Linear:
        """The Linear layer that reads the input: the projection when there is one."""
        return self.projection if self.projection is not None else self.linears[0]

    @property
    def readout(self) -> str:
        """What the module returns: one of :data:`READOUTS` (training always uses ``"output"``)."""
        return self._readout

    @readout.setter
    def readout(self, value: str) -> None:
        if value not in READOUTS:
            msg = f"readout must be one of {READOUTS}, got {value!r}"
            raise ValueError(msg)
        if value == "hidden" and len(self._sizes) < 3:
            msg = f"readout 'hidden' needs a hidden layer; the layers are {self._sizes[1:]}"
            raise ValueError(msg)
        self._readout = value

    @property
    def n_outputs(self) -> int:
        """Width of what :meth:`forward` returns under the current :attr:`readout`."""
        return self._sizes[1] if self.readout == "hidden" else self._sizes[-1]

    def forward(self, x: torch.Tensor | MaskedViews, n_views: int = 1) -> torch.Tensor:
        """Embed ``(n_views * batch, n_inputs)`` rows (a tensor, or sparse training views).

        Returns ``(n_views * batch, n_outputs)``: with readout ``"output"`` one unit-norm row per
        input row, with ``"unnormalised"`` the same before the normalisation, with ``"hidden"``
        the first hidden layer's activations.
        """
        layers = iter(self.linears)
        if self.projection is not None:  # the PCA coordinates of each (masked) view, then the MLP
            h = x.linear(self.projection) if isinstance(x, MaskedViews) else self.projection(x)
            h = next(layers)(h)
        else:
            first = next(layers)
            h = x.linear(first) if isinstance(x, MaskedViews) else first(x)
        for depth, (norm, linear) in enumerate(zip(self.norms, layers)):
            if n_views > 1 and self.training and isinstance(norm, nn.BatchNorm1d):
                h = torch.cat([norm(chunk) for chunk in h.chunk(n_views)])
            else:
                h = norm(h)
            h = F.relu(h)
            if depth == 0 and self.readout == "hidden":
                return h
            h = linear(h)
        return h if self.readout == "unnormalised" else F.normalize(h, dim=1)


class FusedEmbedder(nn.Module):
    """A trained encoder's output side by side with a PCA projection of part of the same input.

    Each block is centred and divided by its root-mean-square row norm on the training cells, so
    the two weigh the same in Euclidean clustering whatever their dimensions.

    Parameters
    ----------
    encoder
        The trained :class:`ContrastiveEncoder`.
    pca_index
        Input columns the PCA block reads, ``(g,)``.
    pca_mean, pca_components
        The fitted PCA: ``(g,)`` mean and ``(k, g)`` components.
    centers, scales
        Per-block centre ``(d,)``/``(k,)`` and scalar scale: ``encoder`` first, PCA second.

    Notes
    -----
    Everything after the encoder is linear, so the whole module exports to one ONNX graph and
    the served model needs nothing beside it.
    """

    def __init__(self, encoder: ContrastiveEncoder, pca_index: torch.Tensor, pca_mean: torch.Tensor,
                 pca_components: torch.Tensor, centers: tuple[torch.Tensor, torch.Tensor],
                 scales: tuple[float, float]) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("pca_index", torch.as_tensor(pca_index, dtype=torch.int64))
        self.register_buffer("pca_mean", torch.as_tensor(pca_mean, dtype=torch.float32))
        self.register_buffer("pca_components", torch.as_tensor(pca_components, dtype=torch.float32))
        self.register_buffer("z_center", torch.as_tensor(centers[0], dtype=torch.float32))
        self.register_buffer("p_center", torch.as_tensor(centers[1], dtype=torch.float32))
        self.register_buffer("z_scale", torch.as_tensor(float(scales[0]), dtype=torch.float32))
        self.register_buffer("p_scale", torch.as_tensor(float(scales[1]), dtype=torch.float32))
        self.n_inputs = encoder.n_inputs
        self.n_outputs = encoder.n_outputs + self.pca_components.shape[0]

    @property
    def init_args(self) -> dict:
        """What :meth:`empty` needs to rebuild this module's shapes (saved in its checkpoint)."""
        n_components, n_pca_genes = self.pca_components.shape
        return {"encoder": self.encoder.init_args, "n_pca_genes": int(n_pca_genes), "n_components": int(n_components)}

    @classmethod
    def fit(cls, encoder: ContrastiveEncoder, block, sample: np.ndarray, encoder_weight: float) -> FusedEmbedder:
        """The encoder beside a fitted PCA block, each block centred and scaled on ``sample`` (preprocessed rows).

        Parameters
        ----------
        encoder
            The trained encoder.
        block
            The PCA block (:class:`~contrastive_sc.method.fusion.PCABlock`): ``index``, ``mean``,
            ``components`` and ``transform(rows)``.
        sample
            Rows of the preprocessed input the centres and scales are measured on.
        encoder_weight
            The encoder block's root-mean-square norm relative to the PCA block's.
        """
        blocks = (encode(encoder, sample), block.transform(sample))
        centers = [b.mean(axis=0) for b in blocks]
        scales = [max(float(np.sqrt(((b - c) ** 2).sum(axis=1).mean())), 1e-12) for b, c in zip(blocks, centers)]
        scales[0] /= encoder_weight
        return cls(encoder, torch.from_numpy(block.index), torch.from_numpy(block.mean),
                   torch.from_numpy(block.components), tuple(map(torch.from_numpy, centers)), scales).eval()

    @classmethod
    def empty(cls, encoder: ContrastiveEncoder, n_pca_genes: int, n_components: int) -> FusedEmbedder:
        """A module of the right shapes, to load a saved ``state_dict`` into."""
        return cls(encoder, torch.zeros(n_pca_genes, dtype=torch.int64), torch.zeros(n_pca_genes),
                   torch.zeros(n_components, n_pca_genes), (torch.zeros(encoder.n_outputs), torch.zeros(n_components)),
                   (1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed ``(batch, n_inputs)`` rows to ``(batch, encoder outputs + components)``."""
        z = (self.encoder(x) - self.z_center) / self.z_scale
        p = torch.mm(x.index_select(1, self.pca_index) - self.pca_mean, self.pca_components.t())
        return torch.cat([z, (p - self.p_center) / self.p_scale], dim=1)


@torch.no_grad()
def encode(encoder: nn.Module, x: Rows | np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """Embed preprocessed rows with a trained encoder (eval mode, no augmentation), a batch at a time."""
    encoder.eval()
    return collect(lambda rows: encoder(torch.as_tensor(rows, dtype=torch.float32)).numpy(), as_rows(x),
                   encoder.n_outputs, size=batch_size)


#: Version of the checkpoint written by :func:`save_checkpoint`.
CHECKPOINT_VERSION = 2


@dataclass(frozen=True)
class Checkpoint:
    """A module loaded by :func:`load_checkpoint`, with the genes it reads and the id of its model."""

    module: nn.Module
    genes: tuple[str, ...] | None
    model_id: str | None


def save_checkpoint(module: ContrastiveEncoder | FusedEmbedder, path, *, genes, model_id: str) -> None:
    """Write ``module`` with its constructor arguments, its input genes and its model's id (nanoGPT's ``model_args``)."""
    torch.save({"version": CHECKPOINT_VERSION, "module": type(module).__name__, "init_args": module.init_args,
                "state_dict": module.state_dict(), "genes": list(genes), "model_id": model_id}, path)


def load_checkpoint(path) -> Checkpoint:
    """Rebuild the module written by :func:`save_checkpoint` (or by releases before it) in eval mode."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "init_args" not in checkpoint:
        checkpoint = _from_first_release(checkpoint)
    args = checkpoint["init_args"]
    if checkpoint["module"] == "FusedEmbedder":
        module = FusedEmbedder.empty(ContrastiveEncoder(**args["encoder"]), args["n_pca_genes"], args["n_components"])
    elif checkpoint["module"] == "ContrastiveEncoder":
        module = ContrastiveEncoder(**args)
    else:
        msg = f"{path}: unknown module {checkpoint['module']!r}; expected ContrastiveEncoder or FusedEmbedder"
        raise ValueError(msg)
    module.load_state_dict(checkpoint["state_dict"])
    genes = checkpoint.get("genes")
    return Checkpoint(module.eval(), None if genes is None else tuple(genes), checkpoint.get("model_id"))


def _from_first_release(checkpoint: dict) -> dict:
    # The first releases saved the encoder's shape as loose keys; the genes and the model id lived
    # in other files of the folder.
    projection = checkpoint["projection_shape"][0] if checkpoint.get("input_projection", "none") != "none" else 0
    encoder = {"n_inputs": checkpoint["n_inputs"], "layers": list(checkpoint["layers"]),
               "batch_norm": checkpoint.get("batch_norm", True), "readout": checkpoint.get("readout", "output"),
               "projection": projection}
    if "pca_shape" not in checkpoint:
        return {"module": "ContrastiveEncoder", "init_args": encoder, "state_dict": checkpoint["state_dict"]}
    n_components, n_pca_genes = checkpoint["pca_shape"]
    return {"module": "FusedEmbedder", "state_dict": checkpoint["state_dict"],
            "init_args": {"encoder": encoder, "n_pca_genes": n_pca_genes, "n_components": n_components}}
