from workers.presets import byte_level_tokenizer
from workers.text_output import TextOutput


class ByteDecoder:
    """The tiny preset's tokenizer: token id = byte value."""

    def __init__(self):
        self._tokenizer = byte_level_tokenizer()

    def decode(self, ids):
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def feed(output, text):
    stops = [output.append(byte) for byte in text.encode()]
    return stops


def test_a_character_split_across_tokens_is_released_whole():
    output = TextOutput(ByteDecoder(), [256, 65], stop=())
    output.append(0xC3)
    assert output.take_delta(finished=False) == ""
    output.append(0xA9)
    assert output.take_delta(finished=False) == "é"
    feed(output, " ok")
    assert output.take_delta(finished=False) == " ok"
    assert output.text == "é ok"


def test_stop_string_cuts_the_text_and_is_reported_once_complete():
    output = TextOutput(ByteDecoder(), [256], stop=("END",))
    assert feed(output, "abcEN") == [False] * 5
    assert output.take_delta(finished=False) == "abc"  # 'EN' is held back: it may start 'END'
    assert output.append(ord("D")) is True
    assert output.text == "abc"
    assert output.take_delta(finished=True) == ""


def test_held_back_text_is_released_at_the_end():
    output = TextOutput(ByteDecoder(), [256], stop=("xyz",))
    feed(output, "hello x")
    assert output.take_delta(finished=False) == "hello"
    output.finish()
    assert output.take_delta(finished=True) == " x"


def test_an_incomplete_character_at_the_end_is_flushed_on_finish():
    output = TextOutput(ByteDecoder(), [256], stop=())
    output.append(0xF0)
    assert output.take_delta(finished=False) == ""
    output.finish()
    assert output.take_delta(finished=True) == "\ufffd"


def test_without_a_tokenizer_there_is_no_text():
    output = TextOutput(None, [1, 2], stop=())
    assert output.append(5) is False
    output.finish()
    assert output.take_delta(finished=True) == ""
