"""Test-only stand-in for flash_attn.bert_padding; calling any of these is a test bug."""


def _unavailable(*args, **kwargs):
    raise RuntimeError("flash_attn test stub: not callable on CPU")


index_first_axis = pad_input = unpad_input = rearrange = _unavailable
