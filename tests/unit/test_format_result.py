from jailcell import Result
from jailcell.integrations.tools import format_result


def test_ok_with_output_value_and_image():
    r = Result(status="ok", stdout="hi\n", result="42", outputs=[{"mime_type": "image/png", "data": "x"}],
               files=[{"name": "a.csv", "size": 3}])
    text = format_result(r)
    assert "[stdout]\nhi" in text and "[result]\n42" in text and "[image 1: image/png" in text
    assert "a.csv (3 bytes)" in text and "status" not in text


def test_error_has_status_and_traceback():
    r = Result(status="error", error={"type": "KeyError", "message": "'k'", "traceback": "Traceback...\nKeyError: 'k'"})
    text = format_result(r)
    assert text.startswith("[status: error: 'k']") and "KeyError: 'k'" in text


def test_long_output_is_truncated_with_notice_within_budget():
    r = Result(status="output_limit", stdout="a" * 50_000 + "END", error={"type": "OutputLimit", "message": "too much"})
    text = format_result(r, max_chars=2000)
    assert len(text) <= 2100 and "truncated" in text and text.rstrip().endswith("END")


def test_empty():
    assert format_result(Result(status="ok")) == "[no output]"
