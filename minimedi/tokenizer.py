"""CLIP's tokenizer: text cleaning, a pre-tokenising regex, and byte-level BPE (Radford et al. 2021).

Byte-pair encoding (Sennrich et al. 2016) starts from small symbols and repeatedly joins the adjacent
pair that was most frequent in the training corpus; the learned merges, in order, are the merges file.
CLIP, like GPT-2, runs BPE on UTF-8 *bytes*, so every string is encodable and nothing maps to an
unknown token. Each byte is shown as one printable character (`byte_symbols`) so that merges can be
written as text, and the last symbol of every word carries `</w>`, so "lesion" as a whole word and
"lesion" inside "lesions" are different tokens.

The pipeline, which must match OpenAI's `SimpleTokenizer` and `clip.tokenize` id for id:

    text -> clean (ftfy, html-unescape twice, collapse whitespace, lowercase)
         -> pieces (special tokens, contractions, letter runs, single digits, other symbol runs)
         -> per piece: UTF-8 bytes -> byte ids, `</w>` on the last -> merges -> token ids
    ids  -> [start] + ids + [end], zero-padded to the context length

Speed. Captions reuse a small set of pieces, so each piece's ids are cached (the cache grows with
the number of distinct pieces, as in the reference). Symbols are integer ids, and because the vocabulary
lists merged tokens in merge order, the id of a merged token *is* its merge rank plus 512: the best
pair is simply the one whose merge yields the smallest id. Most captions are plain ASCII, which
ftfy and `html.unescape` leave untouched, so they skip that cleaning (the slowest step).
"""
import gzip
import html
import pathlib
import zlib

import ftfy
import regex
import torch

from minimedi.errors import UserError

DEFAULT_MERGES = pathlib.Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file: 49408 tokens in all
END_OF_WORD = "</w>"
SPECIAL = ("<|startoftext|>", "<|endoftext|>")
NO_MERGE = 1 << 62  # larger than any token id

# Pre-tokenisation; BPE never merges across these pieces. Case-insensitive, like the reference.
PIECES = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>"  # special tokens stay whole
    r"|'s|'t|'re|'ve|'m|'ll|'d"  # contractions split off their word
    r"|\p{L}+"  # a run of letters (any script)
    r"|\p{N}"  # one digit: numbers are spelled digit by digit
    r"|[^\s\p{L}\p{N}]+",  # a run of anything else that is not whitespace
    regex.IGNORECASE,
)
WHITESPACE = regex.compile(r"\s+")
# Printable ASCII without '&', plus tab and newline: ftfy (no mojibake, curly quotes, wide forms,
# control or escape characters to fix) and html.unescape (no entities) return such text unchanged.
PLAIN_ASCII = regex.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def byte_symbols():
    """The 256 byte symbols in vocabulary order, as (byte, character) pairs.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen) get
    chr(256 + n), so no symbol is whitespace or a control character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + n)) for n, b in enumerate(others)]


def read_merges(path):
    """The first N_MERGES merge rules of a gzipped CLIP merges file, as (left, right) string pairs."""
    try:
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the CLIP BPE merges file {path}: {e}") from None
    merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]  # line 0 is a version header
    if len(merges) < N_MERGES or any(len(m) != 2 for m in merges):
        raise UserError(f"{path} is not a CLIP BPE merges file: expected {N_MERGES} lines of 'left right'")
    return merges


def clean(text):
    """Repair mojibake and html entities, collapse whitespace and lowercase, as CLIP does."""
    if not PLAIN_ASCII.fullmatch(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return WHITESPACE.sub(" ", text.strip()).strip().lower()


class Tokenizer:
    """CLIP's tokenizer: `encode(text) -> ids`, `decode(ids) -> text`, `tokenizer(texts) -> LongTensor`."""

    def __init__(self, vocab_path=None):
        path = DEFAULT_MERGES if vocab_path is None else pathlib.Path(vocab_path)
        merges = read_merges(path)
        symbols = byte_symbols()
        # Vocabulary: the byte symbols, the same with </w>, one token per merge, then the specials.
        vocab = [c for _, c in symbols] + [c + END_OF_WORD for _, c in symbols]
        vocab += [left + right for left, right in merges] + list(SPECIAL)
        token_id = {token: i for i, token in enumerate(vocab)}
        if len(token_id) != len(vocab):
            raise UserError(f"{path} is not a CLIP BPE merges file: two merges make the same token")
        try:
            # (left id, right id) -> merged id; the merged ids grow with the merge rank.
            self.merges = {(token_id[a], token_id[b]): token_id[a + b] for a, b in merges}
        except KeyError as e:
            raise UserError(f"{path} is not a CLIP BPE merges file: a merge uses unknown symbol {e}") from None
        self.byte_id = [0] * 256  # byte value -> id of its symbol
        for i, (b, _) in enumerate(symbols):
            self.byte_id[b] = i
        # Decoding maps each token back to its bytes. "</w>" and the special tokens are printable
        # ASCII, i.e. their own byte symbols, so they come back as text ("</w>" then becomes a space).
        symbol_byte = {c: b for b, c in symbols}
        self.token_bytes = {i: bytes(symbol_byte[c] for c in token) for i, token in enumerate(vocab)}
        self.sot, self.eot = token_id[SPECIAL[0]], token_id[SPECIAL[1]]
        self.vocab_size = len(vocab)
        self.cache = {SPECIAL[0]: (self.sot,), SPECIAL[1]: (self.eot,)}

    def bpe(self, piece):
        """Token ids of one pre-tokenised piece: its byte symbols, merged lowest rank first.

        Each round merges every left-to-right, non-overlapping occurrence of the best pair (as the
        reference does) before looking for the next best pair."""
        word = [self.byte_id[b] for b in piece.encode("utf-8")]
        word[-1] += 256  # the </w> variant of the last byte
        while len(word) > 1:
            merged = [self.merges.get(pair, NO_MERGE) for pair in zip(word, word[1:])]
            best = min(merged)
            if best == NO_MERGE:
                break
            new_word, i = [], 0
            while i < len(word):
                if i < len(merged) and merged[i] == best:
                    new_word.append(best)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = new_word
        return tuple(word)

    def encode(self, text):
        """Token ids of `text`, without start or end tokens (OpenAI's `SimpleTokenizer.encode`)."""
        ids = []
        for piece in PIECES.findall(clean(text)):
            piece_ids = self.cache.get(piece)
            if piece_ids is None:
                piece_ids = self.cache[piece] = self.bpe(piece)
            ids.extend(piece_ids)
        return ids

    def decode(self, ids):
        """Text of token ids: bytes joined, invalid UTF-8 replaced, each end of word a space."""
        data = b"".join(self.token_bytes[i] for i in ids)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(self, texts, context_length=77, truncate=False):
        """LongTensor [B, context_length]: start token, ids, end token, zero padding (`clip.tokenize`).

        A text too long for the context is an error unless `truncate`, which cuts it and puts the
        end token last (the text encoder pools its features at the end token)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > context_length and not truncate:
                raise UserError(
                    f"text {text[:40]!r}... has {len(ids)} tokens with start and end tokens, more than"
                    f" the context length {context_length}: shorten it or pass truncate=True"
                )
            rows.append(ids)
        return self.pad(rows, context_length)

    def tokenize_corpus(self, texts, context_length=77):
        """(LongTensor [B, context_length], how many texts were cut): every text truncated to the context,
        as CLIP training does (open_clip's `tokenize` always cuts, keeping the end token last). Training
        captions are data, not requests: a long one is cut and counted, never refused, so that a run can
        say once how many of its captions lost their end."""
        rows = [[self.sot, *self.encode(text), self.eot] for text in texts]
        return self.pad(rows, context_length), sum(len(ids) > context_length for ids in rows)

    @staticmethod
    def pad(rows, context_length):
        """Rows of ids -> LongTensor [B, context_length]: each cut to the context with its last id the end
        token, then zero-padded."""
        rows = [ids[:context_length - 1] + ids[-1:] if len(ids) > context_length else ids for ids in rows]
        padded = [ids + [0] * (context_length - len(ids)) for ids in rows]
        return torch.tensor(padded, dtype=torch.long).reshape(len(rows), context_length)
