import numpy as np
import pytest
from tokenizers import pre_tokenizers

from fedsim import alignment
from fedsim.alignment import (
    VocabMap,
    Vocabulary,
    align_sequences,
    align_topk,
    build_vocab_map,
    nearest,
    surface,
    vocab_map,
    vocab_map_key,
    vocabulary,
)
from fedsim.errors import FedsimError
from fedsim.models import model_source

# A byte-level client (GPT-2 style) and a metaspace server (sentencepiece style), by hand.
CLIENT = Vocabulary(
    "client",
    ("<|endoftext|>", "<|im_start|>", "Ġthe", "the", "Ċ", "Ġdogs", "Ġcab", "Ġun", "bel", "iev",
     "able"),
    "byte-level", special_ids=frozenset({0, 1}), roles=(("eos", 0),))
SERVER = Vocabulary(
    "server",
    ("<pad>", "<eos>", "<start>", "<0x0A>", "▁the", "the", "\n", "▁dog", "▁cat", "▁car",
     "▁un", "believable", "bel", "able"),
    "metaspace", special_ids=frozenset({0, 1, 2}), roles=(("pad", 0), ("eos", 1)))


def test_surface_reads_both_markers_and_byte_tokens_as_text():
    assert surface("Ġthe", "byte-level") == surface("▁the", "metaspace") == " the"
    assert surface("Ċ", "byte-level") == surface("<0x0A>", "metaspace") == "\n"
    # A piece of a multi-byte character ("“" is e2 80 9c) keeps its bytes, from either side.
    assert surface("âĢ", "byte-level") == "\udce2\udc80"
    assert surface("<0xE2>", "metaspace") == "\udce2"
    assert set(alignment._byte_level_decoder()) == set(pre_tokenizers.ByteLevel.alphabet())
    with pytest.raises(FedsimError, match="scheme must be one of"):
        surface("x", "wordpiece")


def test_vocabulary_rejects_bad_input():
    with pytest.raises(FedsimError, match="scheme must be one of"):
        Vocabulary("v", ("a",), "wordpiece")
    with pytest.raises(FedsimError, match="special id 3 outside"):
        Vocabulary("v", ("a", "b"), "metaspace", special_ids=frozenset({3}))
    with pytest.raises(FedsimError, match="must name"):
        Vocabulary("v", ("a", "b"), "metaspace", special_ids=frozenset({0}), roles=(("eos", 1),))
    with pytest.raises(FedsimError, match="no tokens"):
        Vocabulary("v", (), "metaspace")


def test_vocab_map_by_hand():
    m = build_vocab_map(CLIENT, SERVER)
    target = [SERVER.tokens[i] for i in m.server_ids]
    assert dict(zip(CLIENT.tokens, target, strict=True)) == {
        "<|endoftext|>": "<eos>",  # a special goes by role: eos to eos
        "<|im_start|>": "<start>",  # no shared role: the nearest special by its literal string
        "Ġthe": "▁the",  # the two word-start markers are the same space
        "the": "the",  # identical strings
        "Ċ": "\n",  # newline: the regular token wins over the byte-fallback <0x0A> (id 3 < 6)
        "Ġdogs": "▁dog",  # edit distance 1
        "Ġcab": "▁cat",  # a tie at distance 1 with ▁car: the smaller server id wins
        "Ġun": "▁un", "bel": "bel", "iev": "bel", "able": "able",
    }
    assert list(m.distance[2:]) == [0, 0, 0, 1, 1, 0, 0, 2, 0]
    assert m.exact_fraction == pytest.approx(6 / 11)
    # Without a bare "the" on the server, the near miss goes to the same target as "Ġthe".
    no_bare = Vocabulary("s2", ("<eos>", "▁the", "▁cat"), "metaspace", frozenset({0}),
                         (("eos", 0),))
    m2 = build_vocab_map(CLIENT, no_bare)
    assert m2.server_ids[CLIENT.tokens.index("the")] == m2.server_ids[2] == 1


def test_nearest_exact_first_then_edit_distance_ties_to_the_earliest():
    index, distance = nearest(["abc", "abd", "xyz", "ab"], ["abx", "abc", "aby", "ab", "abc"])
    assert list(index) == [1, 0, 0, 3]  # "abd": abx and aby tie at 1, abx comes first
    assert list(distance) == [0, 1, 3, 0]
    with pytest.raises(FedsimError, match="no candidates"):
        nearest(["a"], [])


def test_vocab_map_is_cached_once_and_keyed_by_both_vocabularies(tmp_path, monkeypatch):
    builds = []

    def counting(client, server):
        builds.append((client.name, server.name))
        return build_vocab_map(client, server)

    monkeypatch.setattr(alignment, "build_vocab_map", counting)
    first = vocab_map(CLIENT, SERVER, directory=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert [f.name for f in files] == [f"{vocab_map_key(CLIENT, SERVER)}.safetensors"]
    second = vocab_map(CLIENT, SERVER, directory=tmp_path)
    assert len(builds) == 1  # read back, not recomputed
    assert np.array_equal(first.server_ids, second.server_ids)
    assert np.array_equal(first.distance, second.distance)
    # One token changed on either side is another pair: another key, another build.
    other = Vocabulary("server", (*SERVER.tokens[:-1], "ably"), "metaspace", SERVER.special_ids,
                       SERVER.roles)
    assert vocab_map_key(CLIENT, other) != vocab_map_key(CLIENT, SERVER)
    vocab_map(CLIENT, other, directory=tmp_path)
    assert len(builds) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2
    # A damaged entry is rebuilt and overwritten; use_cache=False neither reads nor writes.
    files[0].write_bytes(b"not safetensors")
    assert np.array_equal(vocab_map(CLIENT, SERVER, directory=tmp_path).server_ids,
                          first.server_ids)
    assert len(builds) == 3
    vocab_map(CLIENT, SERVER, directory=tmp_path / "off", use_cache=False)
    assert len(builds) == 4 and not (tmp_path / "off").exists()


def test_align_sequences_pairs_overlapping_pieces():
    assert align_sequences(["un", "believ", "able"], ["unbel", "iev", "able"]) == [
        [0], [0, 1], [2]]
    assert align_sequences(["unbel", "iev", "able"], ["un", "believ", "able"]) == [
        [0, 1], [1], [2]]
    # A coarse tokenization's long token takes all the pieces it covers (token-level DTW
    # with edit-distance costs would give "bel" and "iev" to " un").
    assert align_sequences([" un", "believable"], [" un", "bel", "iev", "able"]) == [
        [0], [1, 2, 3]]
    # A special token (no text) pairs with nothing; a split multi-byte character still pairs.
    assert align_sequences(["", "Hi", " “"], ["Hi", " \udce2\udc80", "\udc9c"]) == [
        [], [0], [1, 2]]
    # Texts that differ (a dummy-prefix space) still align word by word.
    assert align_sequences([" the", " cat"], ["the", " cat"]) == [[0], [1]]
    assert align_sequences([], ["a"]) == [] and align_sequences(["a"], []) == [[]]


def _ids(vocab, *tokens):
    return [vocab.tokens.index(t) for t in tokens]


def test_align_topk_maps_ids_and_averages_aligned_positions():
    m = build_vocab_map(CLIENT, SERVER)
    server_seq = _ids(SERVER, "<eos>", "▁un", "believable")
    client_seq = _ids(CLIENT, "Ġun", "bel", "iev", "able")
    # Top-2 per client position: client ids and probabilities.
    bel, iev, able, the = _ids(CLIENT, "bel", "iev", "able", "Ġthe")
    indices = np.array([[7, the], [bel, iev], [iev, able], [able, the]])
    probs = np.array([[0.9, 0.1], [0.5, 0.3], [0.6, 0.2], [0.7, 0.1]])
    ids, p = align_topk(m, server_seq, client_seq, indices, probs)
    un_s, bel_s, able_s, the_s = _ids(SERVER, "▁un", "bel", "able", "▁the")
    assert ids.tolist() == [[-1, -1], [un_s, the_s], [bel_s, able_s]]  # <eos>: nothing aligned
    assert p[0].tolist() == [0.0, 0.0]
    assert p[1] == pytest.approx([0.9, 0.1])
    # "believable" faces bel, iev, able: bel and iev both map to server "bel", so they add;
    # the three rows are averaged, and ▁the (0.1 / 3) falls outside the top 2.
    assert p[2] == pytest.approx([(0.5 + 0.3 + 0.6) / 3, (0.2 + 0.7) / 3])


def test_align_topk_rejects_bad_input():
    m = build_vocab_map(CLIENT, SERVER)
    seq_s, seq_c = _ids(SERVER, "▁the"), _ids(CLIENT, "Ġthe")
    with pytest.raises(FedsimError, match="probabilities"):
        align_topk(m, seq_s, seq_c, np.array([[2]]), np.array([[-0.5]]))
    with pytest.raises(FedsimError, match="both be"):
        align_topk(m, seq_s, seq_c, np.array([[2, 3]]), np.array([[0.5]]))
    with pytest.raises(FedsimError, match="rows of top-k"):
        align_topk(m, seq_s, seq_c, np.array([[2], [3]]), np.array([[0.5], [0.5]]))
    with pytest.raises(FedsimError, match="client ids must lie"):
        align_topk(m, seq_s, seq_c, np.array([[99]]), np.array([[0.5]]))
    with pytest.raises(FedsimError, match="outside"):
        align_topk(m, [99], seq_c, np.array([[2]]), np.array([[0.5]]))
    with pytest.raises(FedsimError, match="entries"):
        VocabMap(CLIENT, SERVER, np.zeros(3, np.int64), np.zeros(3, np.int32))


# --- the real tokenizers: tiny-llama borrows smollm2's (49,152), tiny-gemma3 gemma3's (262,144)

SENTENCE = ("The committee's unbelievable decision — approved on 3 March — surprised "
            "“everyone”.\nThanks!")


@pytest.fixture(scope="module")
def real():
    llama, gemma = model_source("tiny-llama").tokenizer(), model_source("tiny-gemma3").tokenizer()
    return llama, gemma, vocabulary(llama, "tiny-llama"), vocabulary(gemma, "tiny-gemma3")


def _bytes(text):
    return text.encode("utf-8", "surrogateescape")


def _spans(texts):
    """Each token's byte span [start, end) in the joined text."""
    lengths = np.array([len(_bytes(t)) for t in texts])
    ends = np.cumsum(lengths)
    return list(zip(ends - lengths, ends, strict=True))


def test_real_tokenizers_align_a_sentence(real):
    llama, gemma, client, server = real
    assert (client.scheme, server.scheme) == ("byte-level", "metaspace")
    assert server.tokens[server.role_id("eos")] == "<eos>"
    client_ids, server_ids = llama(SENTENCE)["input_ids"], gemma(SENTENCE)["input_ids"]
    client_texts, server_texts = client.texts(client_ids), server.texts(server_ids)
    # Both read back to the sentence (gemma's <bos> is special: no text).
    assert _bytes("".join(client_texts)) == _bytes("".join(server_texts)) == _bytes(SENTENCE)
    groups = align_sequences(server_texts, client_texts)
    # Same text on both sides: aligned exactly when the tokens' byte spans overlap.
    cs, ss = _spans(client_texts), _spans(server_texts)
    expected = [[j for j, (c0, c1) in enumerate(cs) if c0 < s1 and s0 < c1] for s0, s1 in ss]
    assert groups == expected
    pieces = {server_texts[i]: [client_texts[j] for j in g] for i, g in enumerate(groups)}
    assert pieces[" unbelievable"] == [" unbelie", "vable"]
    assert pieces["everyone"] == ["every", "one"]
    assert groups[0] == []  # <bos>
    # The sentence's client tokens find their server twins through the two markers.
    queries = [client.strings[i] for i in client_ids]
    index, distance = nearest(queries, server.strings)
    found = {client.tokens[c]: server.tokens[index[n]] for n, c in enumerate(client_ids)}
    assert found["Ġcommittee"] == "▁committee" and found["Ċ"] == "\n"
    assert distance[queries.index(" unbelie")] > 0  # no such gemma token: a near one


def test_a_wordpiece_tokenizer_is_refused():
    with pytest.raises(FedsimError, match="byte-level or metaspace"):
        vocabulary(model_source("tiny-bert").tokenizer(), "tiny-bert")


@pytest.mark.slow  # the whole 49k x 262k map: 30-90 s here, once (the default cache keeps it)
def test_real_vocab_map_and_topk(real):
    llama, gemma, client, server = real
    m = vocab_map(client, server)  # the user's cache: the distillation runs reuse it
    assert m.exact_fraction > 0.9
    assert m.server_ids[client.role_id("eos")] == server.role_id("eos")
    assert vocab_map(client, server).server_ids.tolist() == (  # read back from the cache
        m.server_ids.tolist())
    client_ids, server_ids = llama(SENTENCE)["input_ids"], gemma(SENTENCE)["input_ids"]
    # A client sure of each of its own tokens: a server word with a twin gets it back, sure.
    indices = np.array(client_ids)[:, None]
    ids, p = align_topk(m, server_ids, client_ids, indices, np.ones_like(indices, float))
    words = {server.tokens[s]: (server.tokens[i], q) for s, i, q in zip(
        server_ids, ids[:, 0], p[:, 0], strict=True)}
    assert words["▁committee"] == ("▁committee", 1.0) and words["▁March"] == ("▁March", 1.0)
    # " unbelievable" faces " unbelie" and "vable": each row's mass halves in the average.
    assert words["▁unbelievable"][1] == pytest.approx(0.5)
