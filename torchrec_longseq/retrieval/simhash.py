"""ETA's SimHash retrieval (Chen et al. 2021): m-bit signatures, Hamming distance, top-k.

Every item embedding ``e`` (``[d]``) gets an ``m``-bit signature under a fixed random projection
``H`` (``[d, m]``, entries N(0, 1)): bit ``i`` is ``e . H[:, i] > 0``. Two embeddings with a
small angle share most bits, so the Hamming distance between signatures approximates the angle,
and retrieval becomes a scan of integers instead of a scan of ``d``-dim dot products.

Signatures are packed 64 bits per int64 word, ``W = ceil(m / 64)`` words per item::

    bit i of the signature  ->  word i // 64, bit i % 64   (bit 0 = least significant)

    m = 128:  word 0 = bits 0..63,  word 1 = bits 64..127
    m = 32:   word 0 = bits 0..31,  bits 32..63 of the word are 0

Bit 63 of a word is the int64 sign bit, so words are often negative; only their bit patterns
matter. Retrieval takes no gradient: signatures are computed on detached embeddings, and the
gradient reaches the *selected* behaviors through the attention that follows (ETA's design).

``simhash_signatures``, ``simhash_topk`` and ``popcount64`` are ``torch.fx`` leaves. Note that
``torch.fx.wrap`` patches the name in *this* module's globals only: a traced ``forward`` that
calls a name bound by ``from ... import simhash_topk`` runs the Python body and fails; call
``simhash.simhash_topk(...)`` through the module, or ``torch.fx.wrap("simhash_topk")`` at the
top of the calling module (``hamming_distance`` traces from anywhere).
"""

from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from torchrec_longseq.retrieval import kernels
from torchrec_longseq.retrieval.topk import jagged_topk_smallest_int

WORD_BITS = 64

# SWAR popcount masks. None has bit 63 set, so they are positive int64 constants.
_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_LOW63 = 0x7FFFFFFFFFFFFFFF

_NP_BITWISE_COUNT = getattr(np, "bitwise_count", None)  # numpy >= 2


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


def check_num_bits(num_bits: int) -> int:
    """Validate a signature width and return its number of int64 words.

    ``num_bits`` must fit one word (1 to 64; the unused high bits are 0) or be a multiple of 64
    (the packing unit); anything else raises ``ValueError`` naming the value.
    """
    if isinstance(num_bits, bool) or not isinstance(num_bits, int):
        raise ValueError(
            f"num_bits must be an int (1 to 64 or a multiple of 64), got {num_bits!r}"
        )
    if num_bits <= 0 or (num_bits > WORD_BITS and num_bits % WORD_BITS != 0):
        raise ValueError(f"num_bits must be 1 to 64 or a multiple of 64, got {num_bits}")
    return (num_bits + WORD_BITS - 1) // WORD_BITS


def popcount64_swar(x: torch.Tensor) -> torch.Tensor:
    """Number of set bits of every int64 element, in plain elementwise torch ops (SWAR).

    Args:
        x (Tensor): int64 tensor of any shape, on any device; negative values count their sign
            bit like any other bit.

    Returns:
        int64 tensor of the same shape, values in ``[0, 64]``.

    The sign bit is counted apart (``x < 0``) and the SWAR steps run on the low 63 bits, so every
    intermediate stays non-negative: no arithmetic-shift sign smearing and no signed overflow
    (the usual ``* 0x0101010101010101`` final step is replaced by three shift-adds). A dozen
    elementwise ops, no lookup table, no per-bit expansion; traceable and compilable.

    Example::

        popcount64_swar(torch.tensor([0, 7, -1]))  # tensor([0, 3, 64])
    """
    sign = (x < 0).to(torch.int64)
    v = x & _LOW63
    v = v - ((v >> 1) & _M1)  # 2-bit fields: count of their 2 bits
    v = (v & _M2) + ((v >> 2) & _M2)  # 4-bit fields
    v = (v + (v >> 4)) & _M4  # bytes, each <= 8
    v = v + (v >> 8)
    v = v + (v >> 16)
    v = v + (v >> 32)
    return (v & 0x7F) + sign


@torch.fx.wrap
def popcount64(x: torch.Tensor) -> torch.Tensor:
    """Number of set bits of every int64 element (any shape, any device).

    Args:
        x (Tensor): int64 tensor; negative values count their sign bit like any other bit.

    Returns:
        int64 tensor of the same shape, values in ``[0, 64]``.

    On CPU with numpy >= 2 this is ``numpy.bitwise_count`` (a hardware popcount) on a zero-copy
    uint64 view, about 30x faster than the elementwise version
    (``benchmarks/popcount.py``); elsewhere, and under ``torch.compile``, it is
    :func:`popcount64_swar`. The view is uint64 on purpose: on *signed* integers numpy counts the
    bits of the absolute value (``bitwise_count(int64(-1)) == 1``).

    Example::

        popcount64(torch.tensor([0, 7, -1]))  # tensor([0, 3, 64])
    """
    if (
        x.device.type == "cpu"
        and x.dtype == torch.int64
        and _NP_BITWISE_COUNT is not None
        and not _is_compiling()
    ):
        words = x.contiguous().numpy().view(np.uint64)
        return torch.from_numpy(np.asarray(_NP_BITWISE_COUNT(words))).to(torch.int64)
    return popcount64_swar(x)


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamming distance between packed signatures: popcount of ``a ^ b`` summed over words.

    Args:
        a (Tensor): ``[N, W]`` int64 packed signatures.
        b (Tensor): ``[N, W]`` int64 packed signatures (or anything broadcastable to ``a``,
            e.g. ``[1, W]`` for one target against N behaviors).

    Returns:
        ``[N]`` int64 distances in ``[0, 64 W]``. ``N = 0`` gives an empty tensor.

    Works on the packed words (:func:`popcount64`), never expanding bits per behavior.

    Example::

        a = torch.tensor([[0b1011]])
        b = torch.tensor([[0b0001]])
        hamming_distance(a, b)  # tensor([2])
    """
    return popcount64(torch.bitwise_xor(a, b)).sum(dim=-1)


@torch.fx.wrap
def simhash_signatures(embeddings: torch.Tensor, projection: torch.Tensor,
                       kernel: str = "auto") -> torch.Tensor:
    """Packed SimHash signatures of ``[N, d]`` embeddings under a ``[d, m]`` projection.

    Args:
        embeddings (Tensor): ``[N, d]`` float embeddings (detached here: no gradient).
        projection (Tensor): ``[d, m]`` the fixed random hyperplanes ``H``; ``m`` is 1 to 64 or
            a multiple of 64.
        kernel (str): which implementation packs the bits (``retrieval.kernels.KERNELS``).

    Returns:
        ``[N, W]`` int64, ``W = ceil(m / 64)``: bit ``i`` (``e . H[:, i] > 0``) is bit ``i % 64``
        of word ``i // 64``; for ``m < 64`` the high bits are 0. A projection of exactly 0
        gives bit 0 (strict ``>``). ``N = 0`` gives a ``[0, W]`` tensor.

    Example::

        H = torch.randn(16, 64)
        sig = simhash_signatures(torch.randn(5, 16), H)  # [5, 1] int64
    """
    if embeddings.dim() != 2 or projection.dim() != 2:
        raise ValueError(
            f"expected embeddings [N, d] and projection [d, m], got {tuple(embeddings.shape)} "
            f"and {tuple(projection.shape)}"
        )
    if embeddings.shape[1] != projection.shape[0]:
        raise ValueError(
            f"embedding dim {embeddings.shape[1]} does not match projection rows "
            f"{projection.shape[0]}"
        )
    num_bits = projection.shape[1]
    num_words = check_num_bits(num_bits)
    n = embeddings.shape[0]
    with torch.no_grad():
        proj = embeddings.detach().to(projection.dtype) @ projection.detach()  # [N, m]
        packed = kernels.pack_signs(proj, kernel)  # compiled on CPU, else the torch ops
        if packed is not None:
            return packed
        bits = (proj > 0).to(torch.uint8)
        if num_bits < num_words * WORD_BITS:  # m < 64: the high bits of the word are 0
            bits = torch.cat([bits, bits.new_zeros(n, num_words * WORD_BITS - num_bits)], dim=1)
        # pack 8 bits per byte first, then 8 bytes per word: the widest temporary stays at
        # one byte per bit instead of eight
        bits = bits.view(n, num_words, 8, 8)  # [N, W, byte, bit]
        bit_shift = torch.arange(8, dtype=torch.uint8, device=bits.device)
        byte = (bits << bit_shift).sum(dim=-1, dtype=torch.int64)  # [N, W, 8] in [0, 255]
        byte_shift = torch.arange(0, WORD_BITS, 8, dtype=torch.int64, device=bits.device)
        # disjoint bits, so the sum is an OR; the byte shifted into bit 63 wraps to negative
        return (byte << byte_shift).sum(dim=-1)  # [N, W]


@torch.fx.wrap
def simhash_topk(
    history_signatures: torch.Tensor,
    offsets: torch.Tensor,
    target_signatures: torch.Tensor,
    k: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ETA's retrieval: the ``k`` behaviors closest in Hamming distance to each sample's target.

    Args:
        history_signatures (Tensor): ``[N, W]`` int64 packed signatures of the jagged history,
            chronological per sample.
        offsets (Tensor): ``[B + 1]`` history offsets.
        target_signatures (Tensor): ``[B, W]`` int64 packed signature of every sample's target.
        k (int): at most this many per sample.

    Returns:
        ``(indices [M], lengths [B])`` as :func:`jagged_topk`: positions into the history,
        smallest distance first within a sample, ties broken by recency (the later position
        first); ``lengths = min(L_b, k)``. Empty histories and ``k = 0`` select nothing.

    O(N W) integer work plus a segmented sort of the N distances; nothing is padded to the
    longest history.

    Example::

        sim = SimHash(embedding_dim=16, num_bits=64)
        hist = sim(torch.randn(5, 16))                 # [5, 1]
        target = sim(torch.randn(2, 16))               # [2, 1]
        offsets = torch.tensor([0, 3, 5])
        indices, lengths = simhash_topk(hist, offsets, target, k=2)
        # lengths == tensor([2, 2]); indices[:2] in [0, 3), indices[2:] in [3, 5)
    """
    if history_signatures.dim() != 2 or target_signatures.dim() != 2:
        raise ValueError(
            f"expected history [N, W] and target [B, W] signatures, got "
            f"{tuple(history_signatures.shape)} and {tuple(target_signatures.shape)}"
        )
    if history_signatures.shape[1] != target_signatures.shape[1]:
        raise ValueError(
            f"history signatures have {history_signatures.shape[1]} words but target signatures "
            f"have {target_signatures.shape[1]}: they must come from the same SimHash"
        )
    if target_signatures.shape[0] != offsets.numel() - 1:
        raise ValueError(
            f"{target_signatures.shape[0]} target signatures for {offsets.numel() - 1} histories"
        )
    n = history_signatures.shape[0]
    lengths = offsets[1:] - offsets[:-1]
    target = torch.repeat_interleave(target_signatures, lengths, dim=0, output_size=n)  # [N, W]
    distance = hamming_distance(history_signatures, target)  # [N]
    max_distance = history_signatures.shape[1] * WORD_BITS
    return jagged_topk_smallest_int(distance, offsets, k, max_distance)


class SimHash(nn.Module):
    """SimHash with a fixed random projection: ``[N, d]`` embeddings -> ``[N, W]`` int64 words.

    The projection ``H`` (``[d, m]``, N(0, 1)) is drawn from ``seed`` with its own CPU
    ``torch.Generator``, so it does not depend on (or disturb) the global RNG, and is the same on
    every rank and device. It is a persistent buffer: it is saved in the ``state_dict`` and
    never trained. Built on ``device="meta"`` it stays empty until :meth:`reset_parameters`.

    Args:
        embedding_dim (int): ``d``, the embedding dimension.
        num_bits (int): ``m``, signature bits: 1 to 64 or a multiple of 64 (ETA finds AUC
            levels off near ``m = 2 d``).
        seed (int): seed of the projection.
        device (Optional[torch.device]): where the buffer lives.

    Example::

        sim = SimHash(embedding_dim=16, num_bits=128, seed=0)
        signatures = sim(torch.randn(10, 16))  # [10, 2] int64
    """

    def __init__(
        self,
        embedding_dim: int,
        num_bits: int,
        seed: int = 0,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        self.num_words: int = check_num_bits(num_bits)
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        self.embedding_dim = embedding_dim
        self.num_bits = num_bits
        self.seed = seed
        self.kernel = "auto"  # retrieval.kernels.set_kernel
        self.register_buffer(
            "projection", torch.empty(embedding_dim, num_bits, device=device), persistent=True
        )
        if self.projection.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)draw the projection from ``seed`` (also materialises a module built on meta)."""
        generator = torch.Generator().manual_seed(self.seed)
        projection = torch.randn(self.embedding_dim, self.num_bits, generator=generator)
        with torch.no_grad():
            self.projection.copy_(projection)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, d]`` embeddings -> ``[N, W]`` packed int64 signatures (no gradient)."""
        return simhash_signatures(embeddings, self.projection, self.kernel)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, num_bits={self.num_bits}, seed={self.seed}"
