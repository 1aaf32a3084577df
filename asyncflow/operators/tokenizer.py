"""A character tokenizer for synthetic tasks: built in code, nothing to download."""

from __future__ import annotations

from collections.abc import Iterable


class CharTokenizer:
    """Maps each character of a fixed alphabet to an id; ids 0-2 are pad, bos, eos."""

    pad_id, bos_id, eos_id = 0, 1, 2
    _specials = ("<pad>", "<bos>", "<eos>")

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self._id = {ch: i + len(self._specials) for i, ch in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self._specials) + len(self.alphabet)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        try:
            ids = [self._id[ch] for ch in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the alphabet") from None
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text up to the first eos; specials are dropped."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= len(self._specials):
                out.append(self.alphabet[i - len(self._specials)])
        return "".join(out)
