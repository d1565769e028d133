"""A JSONL text holding half a surrogate pair is refused naming its file and line (it
crashed with a bare UnicodeEncodeError while the corpus was being sized)."""

import json

import pytest

from blockdiff_jax.data import corpora


@pytest.mark.parametrize("bad", ["\ud83d", "ok \udc00 then"])
def test_a_lone_surrogate_in_a_jsonl_text_is_named(tmp_path, bad):
  path = tmp_path / "docs.jsonl"
  lines = [json.dumps({"text": "fine text"}), json.dumps({"text": bad})]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"docs\.jsonl:2: field 'text' holds a lone "
                                       r"surrogate U\+(D83D|DC00)"):
    corpora.file_documents(str(path), "train", validation_fraction=0.5, max_bytes=10)


def test_a_whole_emoji_escaped_as_a_pair_is_text(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text(json.dumps({"text": "smile \U0001F600"}) + "\n", encoding="utf-8")
  docs = (corpora.file_documents(str(path), "train", validation_fraction=0.5)
          + corpora.file_documents(str(path), "validation", validation_fraction=0.5))
  assert [d.text for d in docs] == ["smile \U0001F600"]
