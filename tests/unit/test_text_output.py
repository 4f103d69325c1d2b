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


def test_with_min_tokens_a_stop_string_counts_once_it_ends_in_that_token_or_later():
    """min_tokens 6: 'END' ending at token 3 is text; a second one, from token 5 to 7, stops it (a stop string
    that starts before the 6th token but ends after counts); 'X' ending exactly at the 6th token counts, an 'ab'
    ending before it does not."""
    output = TextOutput(ByteDecoder(), [256], stop=("END",), min_tokens=6)
    assert feed(output, "ENDdEND") == [False] * 6 + [True]
    assert output.text == "ENDd"
    at_the_sixth = TextOutput(ByteDecoder(), [256], stop=("X", "ab"), min_tokens=6)
    assert feed(at_the_sixth, "abXabX") == [False] * 5 + [True]
    assert at_the_sixth.text == "abXab"
    replayed = TextOutput(ByteDecoder(), [256], stop=("END",), min_tokens=6)
    assert not replayed.replay(list(b"END"))  # a resumed stream's tokens count towards min_tokens too
    assert feed(replayed, "abEND") == [False] * 4 + [True]
