"""Contrastive language-image pretraining (CLIP), and its sigmoid variant (SigLIP).

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
https://arxiv.org/abs/2103.00020. Reference code: https://github.com/openai/CLIP (``model.py``: the
text transformer, ``encode_text``'s pooling at the end token, the logit scale; the paper's Figure 3:
the loss) and https://github.com/mlfoundations/open_clip (``loss.py``: ``ClipLoss``, ``SigLipLoss``).
The method:

    - an image encoder (here lesson 04's ViT, conv stem, class token) and a text encoder (a causal
      transformer read at the end-of-text token), each followed by a linear projection into a joint
      space of width E, and L2-normalised: I_e, T_e ``(B, E)``;
    - logits = exp(t) * I_e T_e^T  ``(B, B)``: row i scores image i against every caption of the batch,
      t a learned log inverse temperature, initialised at log(1 / 0.07) and clamped so exp(t) <= 100;
    - symmetric InfoNCE: (CE(logits, arange B) + CE(logits^T, arange B)) / 2 (Figure 3);
    - SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training",
      https://arxiv.org/abs/2303.15343, Algorithm 1): every pair is a binary problem,
      -1/B sum_i sum_j log sigmoid(z_ij (exp(t) I_i . T_j + b)), z_ij = 1 on the diagonal and -1 off
      it, with t initialised at log 10 and a learned bias b at -10;
    - zero-shot classification: embed prompts such as "a large red circle" for each class, several
      templates per class averaged (prompt ensembling, as in CLIP's notebook
      ``Prompt_Engineering_for_ImageNet.ipynb``), and pick the class whose text is nearest the image.

Text is Shapes' captions ("a large red circle at the top left and a small blue square at the
bottom"): :class:`Tokenizer` is a word-level tokenizer over :data:`minivfm.data.shapes.VOCAB`.

Shape glossary: B batch, C channels, H x W image, L context length (tokens), V vocabulary size,
D width of an encoder, E joint embedding width, K classes, T prompt templates, N images or pairs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivfm.data.shapes import DEFAULT_COLORS, POSITION_PHRASES, SHAPES, SIZES, VOCAB
from minivfm.models.vit import ViT, adamw_warmup_cosine, headless_kwargs, map_batches, results_trainer
from minivfm.nn import Block
from minivfm.profiles import fill_from_preset, preset_arguments
from minivfm.profiles import profile as _profile

__all__ = [
    "CLIPConfig",
    "Tokenizer",
    "clip_loss",
    "siglip_loss",
    "TextEncoder",
    "CLIP",
    "LitCLIP",
    "TEMPLATES",
    "ensemble_prompts",
    "zeroshot_classifier",
    "zeroshot_predict",
    "retrieval_recall",
    "clip_score",
    "mentions",
    "drop_positions",
    "hard_negative",
    "results",
]

# the 12 classes of Shapes (its default colours), in label order: "red circle", "green circle", ...
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in DEFAULT_COLORS)
# held out of the training captions by the compositional test: every colour and every kind still seen
HELD_OUT = ("red circle", "green square", "blue triangle")


# -- config -----------------------------------------------------------------------------------------


@dataclass
class CLIPConfig:
    """Sizes of CLIP and how to train it; :meth:`preset` picks them for a profile."""

    image_size: int = 32
    in_channels: int = 3
    # the image encoder: lesson 04's ViT with the conv stem, no head
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    stem: str = "conv"
    # the text encoder
    context_length: int = 32
    text_width: int = 64
    text_depth: int = 2
    text_heads: int = 4
    # the joint space and the loss
    joint_dim: int = 64
    loss: str = "clip"  # "clip" (symmetric InfoNCE) or "siglip"
    position_dropout: float = 0.5  # caption augmentation: the share of training captions without positions
    hard_negatives: bool = False  # one caption with a colour or kind swapped per image, as an extra negative
    exclude: tuple[str, ...] = ()  # classes ("red circle") that no training caption, negatives included, names
    # training
    batch_size: int = 128
    max_epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_epochs: float = 1.0
    # data for results(): Shapes scenes with their captions
    num_train: int = 20_000
    num_val: int = 1000
    num_test: int = 2000  # zero-shot test images
    num_retrieval: int = 1000  # held-out image-caption pairs

    @classmethod
    def preset(cls, profile: str | None = None) -> CLIPConfig:
        """The config for a profile (``ci``, ``cpu``, ``gpu``; ``None`` reads ``MINIVFM_PROFILE``)."""
        name = _profile(profile)
        if name == "ci":
            return cls(
                patch_size=8, embed_dim=32, depth=2, num_heads=2, text_width=32, text_depth=1, text_heads=2,
                joint_dim=32, batch_size=64, max_epochs=2, lr=2e-3, warmup_epochs=0.5, num_train=1024,
                num_val=128, num_test=300, num_retrieval=200,
            )  # fmt: skip
        if name == "cpu":
            # ViTConfig.preset("cpu")'s image encoder (conv stem: the patch stem stays at the colour-only
            # plateau at this budget, lesson 04). Measured on one thread, 8 epochs, zero-shot accuracy:
            # batch 128 0.404 (retrieval recall@1 0.77), with position dropout 0.389, with hard negatives
            # too 0.370 (45% slower); batch 64 with both 0.445, with position dropout only 0.473 (223 s)
            return cls(
                patch_size=8, embed_dim=64, depth=4, num_heads=4, text_width=64, text_depth=2, text_heads=4,
                joint_dim=64, batch_size=64, max_epochs=8, lr=1e-3, warmup_epochs=1.0, num_train=20_000,
                num_val=1000, num_test=2000, num_retrieval=1000,
            )  # fmt: skip
        return cls(
            patch_size=4, embed_dim=192, depth=6, num_heads=3, text_width=128, text_depth=4, text_heads=4,
            joint_dim=128, batch_size=256, max_epochs=50, lr=1e-3, warmup_epochs=3.0, num_train=100_000,
            num_val=5000, num_test=10_000, num_retrieval=1000,
        )  # fmt: skip

    def image_kwargs(self) -> dict:
        """The arguments of the image encoder :class:`ViT` (no head)."""
        return headless_kwargs(self, stem=self.stem)


# -- text -------------------------------------------------------------------------------------------


class Tokenizer:
    """Word-level tokenizer for Shapes captions.

    Ids: ``0`` padding, ``1`` an unknown word, ``2 ..`` the words of ``vocab`` in order, and the
    end-of-text token last (``eot_id = vocab_size - 1``), so that, as in CLIP, the end token is the
    largest id of a sequence and ``tokens.argmax(-1)`` finds it. Text is lower-cased and split on
    whitespace. A caption with more than ``context_length - 1`` words does not fit with its end
    token: :meth:`encode` raises ``ValueError`` with its length and the limit (CLIP's ``tokenize``
    also refuses by default); nothing is truncated silently.

    Arguments:
        vocab: the words; ``None`` means Shapes' ``VOCAB``.
    """

    PAD, UNK = "<pad>", "<unk>"
    EOT = "<eot>"

    def __init__(self, vocab: Sequence[str] | None = None) -> None:
        words = list(VOCAB if vocab is None else vocab)
        if len(set(words)) != len(words) or not all(isinstance(w, str) and w and w == w.lower() for w in words):
            raise ValueError("vocab: expected distinct, non-empty, lower-case words")
        self.itos = [self.PAD, self.UNK, *words, self.EOT]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.eot_id = 0, 1, len(self.itos) - 1

    @property
    def vocab_size(self) -> int:
        """V: the words, padding, unknown and end-of-text."""
        return len(self.itos)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    def words(self, text: str) -> list[int]:
        """The ids of ``text``'s words (unknown words as ``unk_id``), without the end token."""
        if not isinstance(text, str):
            raise TypeError(f"texts: expected str, got {type(text).__name__}")
        return [self.stoi.get(w, self.unk_id) for w in text.lower().split()]

    def encode(self, texts: str | Sequence[str], context_length: int = 32) -> Tensor:
        """Texts to token ids: the words, the end token, then padding.

        Arguments:
            texts: one str or a sequence of str.
            context_length: L, the length of every row.

        Returns:
            LongTensor ``(B, L)`` (``(1, L)`` for one str).

        Raises:
            TypeError: an element is not a str.
            ValueError: a text has more than ``L - 1`` words.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence):
            raise TypeError(f"texts: expected a str or a sequence of str, got {type(texts).__name__}")
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length: expected an int >= 2, got {context_length!r}")
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.words(text)
            if len(ids) + 1 > context_length:
                raise ValueError(
                    f"texts[{i}] has {len(ids)} words, {len(ids) + 1} tokens with the end token, more than "
                    f"context_length={context_length}: {text[:60]!r}"
                )
            out[i, : len(ids) + 1] = torch.tensor([*ids, self.eot_id])
        return out

    def decode(self, tokens: Tensor | Sequence[int]) -> str | list[str]:
        """Token ids back to text: a row ``(L,)`` gives a str, a batch ``(B, L)`` a list of str.
        Reading stops at the end token; padding is skipped; unknown words come back as ``<unk>``."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return [self.decode(row) for row in tokens]
        if tokens.ndim != 1:
            raise ValueError(f"tokens: expected (L,) or (B, L) ids, got shape {tuple(tokens.shape)}")
        words = []
        for i in tokens.tolist():
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"tokens: id {i} is not in [0, {self.vocab_size})")
            if i == self.eot_id:
                break
            if i != self.pad_id:
                words.append(self.itos[i])
        return " ".join(words)


class TextEncoder(nn.Module):
    """A causal transformer over token ids, read at the end-of-text token (CLIP's ``encode_text``).

    Token and learned position embeddings, pre-norm blocks with causal self-attention
    (:class:`minivfm.nn.Block`, ``is_causal=True``), a final LayerNorm, and the features of the
    end token, the largest id of each row (``tokens.argmax(-1)``, CLIP's trick). Causality makes
    the end token's features a function of the words before it only, so padding changes nothing.

    Arguments:
        vocab_size: V.
        context_length: L, the most tokens.
        width: D.
        depth: blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of D.
    """

    def __init__(
        self, vocab_size: int, context_length: int = 32, width: int = 64, depth: int = 2, num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.vocab_size, self.context_length, self.width = vocab_size, context_length, width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio) for _ in range(depth)])
        self.ln_final = nn.LayerNorm(width, eps=1e-6)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """Token ids ``(B, L')`` with ``L' <= L`` -> the end token's features ``(B, D)``."""
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype != torch.long:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens: expected a LongTensor (B, L) of token ids, got {got}")
        B, n = tokens.shape
        if n > self.context_length:
            raise ValueError(f"tokens: {n} tokens, more than context_length={self.context_length}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"tokens: ids must be in [0, {self.vocab_size}), got {tokens.min()}..{tokens.max()}")
        x = self.token_embedding(tokens) + self.positional_embedding[:, :n]  # (B, L, D)
        for block in self.blocks:
            x = block(x, is_causal=True)  # (B, L, D)
        x = self.ln_final(x)
        return x[torch.arange(B, device=x.device), tokens.argmax(dim=-1)]  # (B, D), at the end token


# -- the losses -------------------------------------------------------------------------------------


def _check_embeddings(image_emb: Tensor, text_emb: Tensor, extra_texts: bool = False) -> None:
    for name, e in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(e, Tensor) or e.ndim != 2:
            got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(f"{name}: expected embeddings (B, E), got {got}")
    B, E = image_emb.shape
    if text_emb.shape[1] != E or len(text_emb) < B or (not extra_texts and len(text_emb) != B):
        want = "(B + M, E), the B captions first," if extra_texts else "the same shape (B, E),"
        raise ValueError(
            f"image_emb and text_emb: expected {want} pair i in row i of both, got {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE (CLIP's Figure 3; open_clip's ``ClipLoss``).

    Arguments:
        image_emb: L2-normalised image embeddings ``(B, E)``.
        text_emb: L2-normalised text embeddings ``(B, E)``, row i the caption of image i; or ``(B + M, E)``
            with M extra captions after them that match no image (hard negatives, as NegCLIP's).
        logit_scale: the multiplier exp(t) (not its log), a float or a scalar tensor.

    Returns:
        A scalar: the mean of the image-to-text cross-entropy of ``logits = logit_scale * image_emb @
        text_emb.T`` ``(B, B + M)`` and the text-to-image one of its first B columns, transposed, with
        the diagonal as the targets.
    """
    _check_embeddings(image_emb, text_emb, extra_texts=True)
    B = len(image_emb)
    logits = logit_scale * image_emb @ text_emb.T  # (B, B + M): row i, image i against every text
    targets = torch.arange(B, device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits[:, :B].T, targets)) / 2


def siglip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float) -> Tensor:
    """The pairwise sigmoid loss (SigLIP, Algorithm 1; open_clip's ``SigLipLoss``).

    Arguments:
        image_emb: L2-normalised image embeddings ``(B, E)``.
        text_emb: L2-normalised text embeddings ``(B, E)``, row i the caption of image i; or ``(B + M, E)``
            with M extra captions that match no image (hard negatives).
        logit_scale: the multiplier exp(t) (not its log).
        logit_bias: b.

    Returns:
        ``-1/B sum_i sum_j log sigmoid(z_ij (logit_scale * image_i . text_j + b))`` with ``z_ij = 1``
        for ``i = j`` and ``-1`` otherwise: summed over all B (B + M) pairs, divided by B.
    """
    _check_embeddings(image_emb, text_emb, extra_texts=True)
    logits = logit_scale * image_emb @ text_emb.T + logit_bias  # (B, B + M)
    B, BM = logits.shape
    z = 2 * torch.eye(B, BM, device=logits.device, dtype=logits.dtype) - 1  # +1 matching, -1 not
    return -F.logsigmoid(z * logits).sum() / B


def hard_negative(caption: str, exclude: Sequence[str] = (), generator: torch.Generator | None = None) -> str:
    """A caption that does not fit the image: one colour or one kind of shape in ``caption`` replaced
    by another (the swaps of NegCLIP, Yuksekgonul et al. 2023), never naming a class in ``exclude``.
    Contrastive batches rarely hold two captions that differ in one shape's kind only; these do."""
    words = caption.split()
    slots = [(i, DEFAULT_COLORS if w in DEFAULT_COLORS else SHAPES) for i, w in enumerate(words)]
    slots = [(i, values) for i, values in slots if words[i] in values]
    if not slots:
        raise ValueError(f"caption: names no colour or kind of shape to swap: {caption!r}")
    order = torch.randperm(len(slots), generator=generator).tolist()
    for k in order:
        i, values = slots[k]
        others = [v for v in values if v != words[i]]
        for j in torch.randperm(len(others), generator=generator).tolist():
            negative = " ".join([*words[:i], others[j], *words[i + 1 :]])
            if not mentions(negative, exclude):
                return negative
    raise ValueError(f"caption: every swap names an excluded class: {caption!r}")


# -- the model --------------------------------------------------------------------------------------


class CLIP(nn.Module):
    """An image encoder and a text encoder with projections into one normalised space.

    Arguments:
        visual: a :class:`ViT` without a head (``num_classes=0``); its class token is the image feature.
        text: a :class:`TextEncoder`.
        joint_dim: E.
        loss: ``"clip"`` (symmetric InfoNCE, t initialised at log(1 / 0.07)) or ``"siglip"`` (the sigmoid
            loss, t at log 10 and a learned bias b at -10).
        tokenizer: turns captions into ids (:meth:`tokenize`); ``None`` builds the Shapes tokenizer.

    The logit scale used is ``exp(min(t, log 100))``: never above 100, as in CLIP.
    """

    MAX_LOGIT_SCALE = 100.0

    def __init__(
        self,
        visual: ViT,
        text: TextEncoder,
        joint_dim: int = 64,
        loss: str = "clip",
        tokenizer: Tokenizer | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(visual, ViT) or visual.num_classes != 0:
            raise ValueError("visual: expected a minivfm ViT without a head (num_classes=0)")
        if not isinstance(text, TextEncoder):
            raise ValueError(f"text: expected a TextEncoder, got {type(text).__name__}")
        if loss not in ("clip", "siglip"):
            raise ValueError(f"loss: expected 'clip' or 'siglip', got {loss!r}")
        self.tokenizer = tokenizer or Tokenizer()
        if self.tokenizer.vocab_size != text.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} ids, the text encoder {text.vocab_size}")
        self.loss_name = loss
        self.visual = visual
        self.text = text
        self.image_projection = nn.Linear(visual.embed_dim, joint_dim, bias=False)
        self.text_projection = nn.Linear(text.width, joint_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=visual.embed_dim**-0.5)
        nn.init.normal_(self.text_projection.weight, std=text.width**-0.5)
        init = math.log(1 / 0.07) if loss == "clip" else math.log(10.0)
        self.logit_scale = nn.Parameter(torch.tensor(init))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if loss == "siglip" else None

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """Captions -> ids ``(B, L)`` on the model's device."""
        return self.tokenizer.encode(texts, self.context_length).to(self.logit_scale.device)

    def scale(self) -> Tensor:
        """exp(t), clamped to at most 100."""
        return self.logit_scale.clamp(max=math.log(self.MAX_LOGIT_SCALE)).exp()

    def encode_image(self, images: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> L2-normalised embeddings ``(B, E)``."""
        return F.normalize(self.image_projection(self.visual(images)), dim=-1)

    def encode_text(self, tokens: Tensor | str | Sequence[str]) -> Tensor:
        """Token ids ``(B, L)`` (or captions, tokenized first) -> L2-normalised embeddings ``(B, E)``."""
        if not isinstance(tokens, Tensor):
            tokens = self.tokenize(tokens)
        return F.normalize(self.text_projection(self.text(tokens)), dim=-1)

    def loss(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """The model's loss on a batch of normalised embeddings."""
        if self.loss_name == "siglip":
            return siglip_loss(image_emb, text_emb, self.scale(), self.logit_bias)
        return clip_loss(image_emb, text_emb, self.scale())

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images ``(B, C, H, W)`` and their captions' ids ``(B, L)`` -> ``(loss, image_emb (B, E),
        text_emb (B, E))``. ``tokens`` may have ``B + M`` rows: M hard-negative captions after the B."""
        if len(tokens) < len(images):
            raise ValueError(f"images and tokens: expected one caption per image, got {len(images)} and {len(tokens)}")
        image_emb, text_emb = self.encode_image(images), self.encode_text(tokens)  # (B, E), (B + M, E)
        return self.loss(image_emb, text_emb), image_emb, text_emb


# -- zero-shot, retrieval, CLIP score ---------------------------------------------------------------

# prompt templates in the captions' own words; "{}" is a class name such as "red circle"
TEMPLATES = (
    "a {}",
    *(f"a {size} {{}}" for size in SIZES),
    *(f"a {size} {{}} {where}" for size in SIZES for where in POSITION_PHRASES),
)


def ensemble_prompts(text_emb: Tensor) -> Tensor:
    """Prompt ensembling (CLIP's notebook): ``(K, T, E)`` embeddings of T templates per class, each
    normalised, averaged over the templates and normalised again -> ``(K, E)``."""
    if not isinstance(text_emb, Tensor) or text_emb.ndim != 3:
        got = tuple(text_emb.shape) if isinstance(text_emb, Tensor) else type(text_emb).__name__
        raise ValueError(f"text_emb: expected (K, T, E) embeddings, T templates per class, got {got}")
    return F.normalize(F.normalize(text_emb, dim=-1).mean(dim=1), dim=-1)  # (K, E)


@torch.no_grad()
def zeroshot_classifier(
    model: CLIP, class_names: Sequence[str] = CLASS_NAMES, templates: Sequence[str] = TEMPLATES
) -> Tensor:
    """One normalised text embedding per class, ``(K, E)``: every template filled with the class name,
    encoded, and ensembled (:func:`ensemble_prompts`)."""
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError("templates: expected a non-empty sequence of str, each with a '{}' for the class name")
    prompts = [t.format(name) for name in class_names for t in templates]  # K * T, class by class
    model.eval()
    emb = model.encode_text(prompts)  # (K * T, E)
    return ensemble_prompts(emb.reshape(len(class_names), len(templates), -1))


def zeroshot_predict(image_emb: Tensor, class_emb: Tensor) -> Tensor:
    """The class whose text embedding is most similar to each image: ``(N, E), (K, E) -> (N,)``."""
    if image_emb.ndim != 2 or class_emb.ndim != 2 or image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(
            f"image_emb (N, E) and class_emb (K, E): expected the same E, got {tuple(image_emb.shape)} and "
            f"{tuple(class_emb.shape)}"
        )
    return (image_emb @ class_emb.T).argmax(dim=-1)  # (N,)


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, captions: Sequence[str] | None = None) -> dict[str, float]:
    """Recall@1 of image-to-text and text-to-image retrieval among N held-out pairs (row i of both).

    A retrieval is right when it returns the pair's own item, or, given ``captions``, any item whose
    caption is the same text (Shapes repeats short captions: "a large red circle in the center" fits
    several images equally well).

    Returns:
        ``{"i2t": ..., "t2i": ..., "chance": ...}``; ``chance`` is the recall of a random guess
        (1 / N without ``captions``, a little more with repeated captions).
    """
    _check_embeddings(image_emb, text_emb)
    N = len(image_emb)
    sim = image_emb.float() @ text_emb.float().T  # (N, N)
    if captions is None:
        same = torch.eye(N, dtype=torch.bool)
    else:
        if len(captions) != N:
            raise ValueError(f"captions: expected {N}, one per pair, got {len(captions)}")
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        code = torch.tensor([ids[c] for c in captions])
        same = code[:, None] == code[None, :]  # (N, N): pairs i and j have the same caption
    same = same.to(sim.device)
    rows = torch.arange(N, device=sim.device)
    i2t = same[rows, sim.argmax(dim=1)].float().mean().item()  # image i -> best text
    t2i = same[sim.argmax(dim=0), rows].float().mean().item()  # text j -> best image
    return {"i2t": i2t, "t2i": t2i, "chance": same.float().mean().item()}


@torch.no_grad()
def clip_score(model: CLIP, images: Tensor, captions: str | Sequence[str], reduction: str = "mean") -> Tensor:
    """CLIP score (Hessel et al. 2021, torchmetrics' ``CLIPScore``): ``100 * max(cos(I_i, T_i), 0)``
    for each image and its caption, in [0, 100].

    Arguments:
        model: a trained :class:`CLIP`.
        images: ``(N, C, H, W)`` in [-1, 1], as the model was trained on.
        captions: N captions (or one str for one image).
        reduction: ``"mean"``, a scalar averaged over the pairs (torchmetrics'), or ``"none"``, ``(N,)``.
    """
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images: expected (N, C, H, W), got {got}")
    if len(captions) != len(images):
        raise ValueError(f"captions: expected one per image ({len(images)}), got {len(captions)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
    model.eval()
    image_emb = map_batches(model, lambda x: model.encode_image(x).float(), images)  # (N, E)
    text_emb = torch.cat([model.encode_text(list(c)).float().cpu() for c in _chunks(list(captions), 500)])
    score = 100 * (image_emb * text_emb).sum(-1).clamp_min(0)  # (N,)
    return score.mean() if reduction == "mean" else score


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def drop_positions(caption: str) -> str:
    """The caption without its position phrases: "a large red circle at the top left and a small blue
    square" -> "a large red circle and a small blue square" (a caption augmentation)."""
    parts = caption.split(" and ")
    for i, part in enumerate(parts):
        for phrase in sorted(POSITION_PHRASES, key=len, reverse=True):
            if part.endswith(" " + phrase):
                parts[i] = part[: -len(phrase) - 1]
                break
    return " and ".join(parts)


def mentions(caption: str, class_names: Sequence[str]) -> bool:
    """Whether ``caption`` names any of ``class_names`` ("red circle") at any of its shapes."""
    return any(f" {name} " in f" {caption} " for name in class_names)


# -- Lightning --------------------------------------------------------------------------------------


class LitCLIP(L.LightningModule):
    """Trains :class:`CLIP` (or SigLIP, ``loss="siglip"``) on image-caption batches: dicts with
    ``image`` ``(B, C, H, W)`` and ``caption`` (B str), tokenized here. Logs ``train/val/test``
    ``loss``, ``logit_scale`` in training, and, when the batch has Shapes ``label``\\ s, the 12-way
    ``zeroshot_acc`` on validation and test batches (prompts ensembled over :data:`TEMPLATES`).

    Training captions are augmented: a share ``position_dropout`` of them lose their position phrases
    (:func:`drop_positions`), and with ``hard_negatives`` each also appears with one colour or kind
    swapped (:func:`hard_negative`, never naming a class of ``exclude``) as an extra negative text.

    Arguments left ``None`` come from ``CLIPConfig.preset()`` for the active profile. AdamW (weight
    decay on weight matrices only), linear warmup then cosine decay per step. ``max_epochs`` trains
    nothing here: ``minivfm fit`` reads it from ``hparams``.
    """

    def __init__(
        self,
        in_channels: int | None = None,
        image_size: int | None = None,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        stem: str | None = None,
        context_length: int | None = None,
        text_width: int | None = None,
        text_depth: int | None = None,
        text_heads: int | None = None,
        joint_dim: int | None = None,
        loss: str | None = None,
        position_dropout: float | None = None,
        hard_negatives: bool | None = None,
        exclude: tuple[str, ...] | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        warmup_epochs: float | None = None,
        max_epochs: int | None = None,
        profile: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        fill_from_preset(self, CLIPConfig.preset(profile))
        hp = self.hparams
        visual = ViT(**headless_kwargs(hp, stem=hp.stem))
        tokenizer = Tokenizer()
        text = TextEncoder(tokenizer.vocab_size, hp.context_length, hp.text_width, hp.text_depth, hp.text_heads,
                           hp.mlp_ratio)  # fmt: skip
        self.model = self.build_model(visual, text, hp.joint_dim, hp.loss, tokenizer)
        self._class_emb: Tensor | None = None

    def build_model(self, visual: ViT, text: TextEncoder, joint_dim: int, loss: str, tokenizer: Tokenizer) -> CLIP:
        """The :class:`CLIP` to train; a lesson overrides it to train its own subclass."""
        return CLIP(visual, text, joint_dim, loss, tokenizer)

    @classmethod
    def from_config(cls, cfg: CLIPConfig, **overrides) -> LitCLIP:
        """Build from a :class:`CLIPConfig` (the fields that are constructor arguments)."""
        return cls(**{**preset_arguments(cfg, LitCLIP), **overrides})

    def forward(self, images: Tensor) -> Tensor:
        """Normalised image embeddings ``(B, E)``."""
        return self.model.encode_image(images)

    def _step(self, batch: dict, stage: str) -> Tensor:
        images, captions = batch["image"], list(batch["caption"])
        if stage == "train" and self.hparams.position_dropout > 0:
            drop = (torch.rand(len(captions)) < self.hparams.position_dropout).tolist()
            captions = [drop_positions(c) if d else c for c, d in zip(captions, drop)]
        if stage == "train" and self.hparams.hard_negatives:
            captions = captions + [hard_negative(c, self.hparams.exclude) for c in captions]
        loss, image_emb, _ = self.model(images, self.model.tokenize(captions))
        B = len(images)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=B)
        if stage == "train":
            self.log("train/logit_scale", self.model.scale(), on_step=True, on_epoch=False, batch_size=B)
        elif "label" in batch:
            if self._class_emb is None:
                self._class_emb = zeroshot_classifier(self.model)
            pred = zeroshot_predict(image_emb, self._class_emb)
            acc = (pred == batch["label"]).float().mean()
            self.log(f"{stage}/zeroshot_acc", acc, on_epoch=True, prog_bar=True, batch_size=B)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def on_validation_epoch_start(self) -> None:
        self._class_emb = None  # the text encoder has changed: embed the prompts again

    def on_test_epoch_start(self) -> None:
        self._class_emb = None

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self, hp.lr, hp.weight_decay, hp.warmup_epochs, (0.9, 0.98))


# -- results ----------------------------------------------------------------------------------------


def shapes_pairs(num: int, image_size: int = 32, seed: int = 0, exclude: Sequence[str] = ()) -> dict:
    """``num`` Shapes image-caption pairs in memory: ``image`` ``(num, 3, H, W)`` in [-1, 1], ``caption``
    (list of str), ``label`` ``(num,)``. With ``exclude`` (class names such as "red circle"), the items
    whose caption names any of them are skipped and later items of the same seed take their place."""
    from minivfm.data import Shapes

    images, captions, labels, start = [], [], [], 0
    chunk = max(1000, 2 * num) if exclude else num
    data = Shapes(10**9, image_size=image_size, seed=seed)
    while sum(len(c) for c in captions) < num:
        batch = data.get_batch(range(start, start + chunk))
        keep = [i for i, c in enumerate(batch["caption"]) if not mentions(c, exclude)]
        images.append(batch["image"][keep])
        captions.append([batch["caption"][i] for i in keep])
        labels.append(batch["label"][keep])
        start += chunk
    caps = [c for part in captions for c in part][:num]
    return {"image": torch.cat(images)[:num], "caption": caps, "label": torch.cat(labels)[:num]}


def pairs_loader(pairs: dict, batch_size: int, shuffle: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader of ``{"image", "caption", "label"}`` batches over :func:`shapes_pairs`' output."""
    data = torch.utils.data.StackDataset(image=pairs["image"], caption=pairs["caption"], label=pairs["label"])
    n = len(pairs["caption"])
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle and n > batch_size
    )


def train(cfg: CLIPConfig, profile: str | None = None, seed: int = 0) -> LitCLIP:
    """Train CLIP (``cfg.loss``) on ``cfg.num_train`` Shapes pairs (seed 0) without the captions that name
    a class of ``cfg.exclude``; validation on ``cfg.num_val`` pairs (seed 1)."""
    L.seed_everything(seed, verbose=False)
    train_pairs = shapes_pairs(cfg.num_train, cfg.image_size, seed=0, exclude=cfg.exclude)
    val_pairs = shapes_pairs(cfg.num_val, cfg.image_size, seed=1)
    lit = LitCLIP.from_config(cfg)
    trainer = results_trainer(cfg.max_epochs, _profile(profile), num_sanity_val_steps=0)
    trainer.fit(lit, pairs_loader(train_pairs, cfg.batch_size), pairs_loader(val_pairs, 500, shuffle=False))
    return lit


@torch.no_grad()
def evaluate(model: CLIP, test: dict, retrieval: dict, held_out: Sequence[str] = HELD_OUT) -> dict[str, float]:
    """Zero-shot accuracy on ``test`` (12-way; also on the images whose class is in ``held_out``, on
    the others, and on the scenes of one shape), and recall@1 both ways on the ``retrieval`` pairs."""
    model.eval()
    class_emb = zeroshot_classifier(model).cpu()
    pred = zeroshot_predict(map_batches(model, lambda x: model.encode_image(x).float(), test["image"]), class_emb)
    right = pred == test["label"]
    held = torch.tensor([CLASS_NAMES[k] in held_out for k in test["label"].tolist()])
    one_shape = torch.tensor([" and " not in c for c in test["caption"]])  # captions join shapes with "and"
    image_emb = map_batches(model, lambda x: model.encode_image(x).float(), retrieval["image"])
    text_emb = torch.cat([model.encode_text(c).float().cpu() for c in _chunks(retrieval["caption"], 500)])
    recall = retrieval_recall(image_emb, text_emb, retrieval["caption"])
    return {
        "zeroshot_acc": right.float().mean().item(), "heldout_acc": right[held].float().mean().item(),
        "seen_acc": right[~held].float().mean().item(), "one_shape_acc": right[one_shape].float().mean().item(),
        "r1_i2t": recall["i2t"], "r1_t2i": recall["t2i"], "r1_chance": recall["chance"],
    }  # fmt: skip


def results(profile: str) -> dict:
    """Train under ``profile`` on Shapes scenes with their captions, then measure:

    - ``zeroshot_acc``: CLIP (InfoNCE), 12-way zero-shot accuracy on ``num_test`` Shapes test images
      (seed 2; the class of the largest shape) from prompts ensembled over :data:`TEMPLATES`;
      ``zeroshot_acc_siglip``: the same recipe trained with the sigmoid loss; baseline: chance, 1/12;
      ``zeroshot_acc_one_shape``: CLIP on the test scenes that hold one shape (about a third), where
      the class does not hinge on which shape is the largest;
    - ``zeroshot_heldout_acc``: CLIP trained again without any caption that names one of
      :data:`HELD_OUT` (red circle, green square, blue triangle; each colour and kind is still seen in
      other combinations), 12-way zero-shot accuracy on the test images whose class is held out;
      baseline 1/12 (``zeroshot_heldout_acc_seen``: the same model on the other classes);
    - ``retrieval_r1_i2t`` and ``retrieval_r1_t2i``: the first CLIP's recall@1 among ``num_retrieval``
      held-out image-caption pairs (seed 3), an identical caption counting as a hit; baseline 1/N;
    - ``seconds``: everything above.
    """
    threads = torch.get_num_threads()
    if _profile(profile) == "ci":
        torch.set_num_threads(1)  # tiny models: one thread beats two threads fighting over small ops
    try:
        return _results(profile)
    finally:
        torch.set_num_threads(threads)


def _results(profile: str) -> dict:
    from dataclasses import replace

    cfg = CLIPConfig.preset(profile)
    start = time.perf_counter()
    test = shapes_pairs(cfg.num_test, cfg.image_size, seed=2)
    retrieval = shapes_pairs(cfg.num_retrieval, cfg.image_size, seed=3)
    clip = evaluate(train(cfg, profile).model, test, retrieval)
    siglip = evaluate(train(replace(cfg, loss="siglip"), profile).model, test, retrieval)
    held = evaluate(train(replace(cfg, exclude=HELD_OUT), profile).model, test, retrieval)
    return {
        "zeroshot_acc": clip["zeroshot_acc"], "zeroshot_acc_siglip": siglip["zeroshot_acc"],
        "zeroshot_acc_one_shape": clip["one_shape_acc"],
        "zeroshot_heldout_acc": held["heldout_acc"], "zeroshot_heldout_acc_seen": held["seen_acc"],
        "retrieval_r1_i2t": clip["r1_i2t"], "retrieval_r1_t2i": clip["r1_t2i"],
        "retrieval_r1_i2t_siglip": siglip["r1_i2t"], "retrieval_r1_t2i_siglip": siglip["r1_t2i"],
        "seconds": time.perf_counter() - start,
        "baselines": {
            "zeroshot_acc": 1 / 12, "zeroshot_acc_siglip": 1 / 12, "zeroshot_acc_one_shape": 1 / 12,
            "zeroshot_heldout_acc": 1 / 12,
            "retrieval_r1_i2t": 1 / cfg.num_retrieval, "retrieval_r1_t2i": 1 / cfg.num_retrieval,
        },
    }  # fmt: skip
