"""Encoding specs: the grammar, canonical text round trip, patch arguments, and bad specs refused by name."""
import pytest

from posenc.specs import EncodingSpec, parse_spec, parse_specs


@pytest.mark.parametrize("text, name, options, layers", [
    ("original", "original", {}, None),
    ("rope", "rope", {}, None),
    ("hope", "hope", {}, None),
    ("hope:2048", "hope", {"context_length": 2048}, None),
    ("prope:0.25", "prope", {"p": 0.25}, None),
    ("p-rope:0.75", "prope", {"p": 0.75}, None),
    ("NoPE", "nope", {}, None),
    ("hope:2048@full_attention", "hope", {"context_length": 2048}, "full_attention"),
    ("nope@0-3", "nope", {}, (0, 1, 2, 3)),
    ("rope@0+5+7", "rope", {}, (0, 5, 7)),
    ("prope:1@7+0-2+1", "prope", {"p": 1.0}, (0, 1, 2, 7)),
])
def test_parse(text, name, options, layers):
    spec = parse_spec(text)
    assert (spec.name, spec.options, spec.layers) == (name, options, layers)
    assert parse_spec(str(spec)) == spec  # the canonical text round-trips
    assert str(parse_spec(str(spec))) == str(spec)


def test_canonical_text():
    assert str(parse_spec("hope:2048@full_attention")) == "hope:2048@full_attention"
    assert str(parse_spec("nope@3+0-2+5")) == "nope@0-3+5"
    assert str(parse_spec("prope:0.25@0+5+7")) == "prope:0.25@0+5+7"
    assert str(EncodingSpec("rope", {}, (4, 2, 3))) == "rope@2-4"


def test_patch_kwargs():
    assert parse_spec("original").patch_kwargs() is None
    assert parse_spec("hope:512@1-2").patch_kwargs() == {"encoding": "hope", "layers": (1, 2), "context_length": 512}
    assert parse_spec("prope").patch_kwargs() == {"encoding": "prope", "layers": None}
    assert parse_spec("nope@sliding_attention").patch_kwargs() == {"encoding": "nope", "layers": "sliding_attention"}


def test_patch_kwargs_drive_posenc_patch():
    hf_tiny = pytest.importorskip("hf_tiny")
    import posenc
    model = hf_tiny.tiny_model("gemma3_text")
    posenc.patch(model, **parse_spec("hope:64@full_attention").patch_kwargs())
    rp = model.config.rope_parameters
    assert rp["full_attention"]["posenc"]["encoding"] == "hope"
    assert rp["full_attention"]["posenc"]["kwargs"] == {"context_length": 64}
    assert rp["sliding_attention"]["rope_type"] == "default"
    posenc.unpatch(model)
    assert not posenc.is_patched(model)


@pytest.mark.parametrize("text, words", [
    ("yarn", "unknown encoding"),
    ("hope:0", "positive integer"),
    ("hope:1.5", "positive integer"),
    ("prope:0", "(0, 1]"),
    ("prope:1.5", "(0, 1]"),
    ("prope:nan", "(0, 1]"),
    ("prope:", "nothing after ':'"),
    ("nope:3", "takes no value"),
    ("rope@", "nothing after '@'"),
    ("original@0", "takes no layers"),
    ("nope@3-1", "backwards"),
    ("nope@0-x", "neither a layer type nor indices"),
])
def test_bad_spec_names_itself_and_grammar(text, words):
    with pytest.raises(ValueError) as e:
        parse_spec(text)
    assert repr(text) in str(e.value) and words in str(e.value) and "NAME[:VALUE][@LAYERS]" in str(e.value)


def test_parse_specs():
    specs = parse_specs("original, hope,prope:0.75,prope:0.25,nope@0-1")
    assert [str(s) for s in specs] == ["original", "hope", "prope:0.75", "prope:0.25", "nope@0-1"]
    with pytest.raises(ValueError, match="repeats"):
        parse_specs("hope,nope,hope")
    with pytest.raises(ValueError, match="repeats"):
        parse_specs("p-rope:0.5,prope:0.50")  # equal after canonicalisation
    with pytest.raises(ValueError, match="empty entry"):
        parse_specs("hope,,nope")
    with pytest.raises(ValueError, match="no encoding spec"):
        parse_specs(" ")
    with pytest.raises(TypeError):
        parse_spec(3)


def test_spec_constructor_checks_and_hash():
    with pytest.raises(ValueError):
        EncodingSpec("hope", {"p": 0.5})
    with pytest.raises(ValueError):
        EncodingSpec("rope", {}, (-1,))
    with pytest.raises(ValueError):
        EncodingSpec("original", {}, "full_attention")
    assert len({parse_spec("hope:4"), parse_spec("HOPE:4"), parse_spec("nope")}) == 2
