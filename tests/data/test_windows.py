import numpy as np
import pytest

from shrinkjax.data.sources import file_text, load_text, pydoc_text
from shrinkjax.data.windows import batches, tokenize, windows


def test_non_overlapping_windows_drop_the_tail():
    ids = np.arange(1000, dtype=np.int32)
    t, s = windows(ids, 128)
    assert t.shape == (7, 128) and s.all()
    np.testing.assert_array_equal(t.reshape(-1), ids[:896])
    t2, _ = windows(ids, 128, max_windows=3)
    np.testing.assert_array_equal(t2, t[:3])


@pytest.mark.parametrize("n,seqlen,stride", [(1000, 128, 64), (777, 100, 30), (300, 300, 100)])
def test_sliding_windows_score_every_target_once(n, seqlen, stride):
    ids = np.arange(n, dtype=np.int32)
    t, s = windows(ids, seqlen, stride=stride)
    scored_targets = t[:, 1:][s[:, 1:]]  # what the perplexity loop scores
    np.testing.assert_array_equal(np.sort(scored_targets), np.arange(1, n))


def test_text_shorter_than_one_window():
    with pytest.raises(
        ValueError, match="text has 10 tokens, shorter than one window of seqlen=64"
    ):
        windows(np.arange(10), 64)


def test_batches_pad_the_last_batch():
    t = np.arange(5 * 4).reshape(5, 4)
    out = list(batches(t, np.ones_like(t, bool), 2))
    assert len(out) == 3
    tok, valid, scored = out[-1]
    assert valid[0].all() and not valid[1].any() and not scored[1].any()


def test_sources(tmp_path):
    assert "assert" in pydoc_text() and len(pydoc_text()) > 100_000
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    assert file_text(str(tmp_path / "*.txt")) == "first\n\nsecond"
    with pytest.raises(FileNotFoundError, match="matches no file"):
        file_text(str(tmp_path / "*.md"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text("file", str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unknown data source 'web'"):
        load_text("web")


def test_token_cache_is_reused(tmp_path, tiny_llama):
    tok = tiny_llama.tokenizer
    a = tokenize("hello world", tok, cache_dir=str(tmp_path), progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    np.save(files[0], np.array([7, 7, 7], np.int32))  # prove the second call reads the cache
    b = tokenize("hello world", tok, cache_dir=str(tmp_path), progress=False)
    assert a.tolist() == tok.encode("hello world") and b.tolist() == [7, 7, 7]
