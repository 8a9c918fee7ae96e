"""What every command-line test checks of a refusal: exit code 1, one line, no traceback."""


def one_error_line(result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
