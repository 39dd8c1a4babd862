r"""Answer extraction and equivalence: MATH's conventions case by case, and never raising on arbitrary text."""

import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kl_lib.tasks.answers import (
    extract_answer,
    extract_choice,
    extract_gsm8k_reference,
    is_equivalent,
    last_boxed,
    normalize,
    parse_number,
)


@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{5}$.", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\fbox{7}", "7"),
    (r"\boxed{1} then \fbox{x^{2}}", "x^{2}"),
    (r"$\boxed 5$", "5"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are not braces
    (r"\boxed{3} and a truncated \boxed{\frac{1", "3"),  # an unclosed box falls back to the last complete one
    (r"\boxed{", None),
    (r"\boxedx{3}", None),
    (r"\boxed{}", ""),
    ("no box here", None),
    ("", None),
    (None, None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("solution, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("#### 1,000 ", "1,000"),
    ("no marker", ""),
])
def test_extract_gsm8k_reference(solution, expected):
    assert extract_gsm8k_reference(solution) == expected


@pytest.mark.parametrize("response, expected", [
    (r"We compute... so the answer is $\boxed{\dfrac{3}{4}}$.", r"\dfrac{3}{4}"),
    (r"The answer is \boxed{7}. #### 8", "7"),  # the box wins
    ("She has 5 + 3 = 8 apples.\n#### 8\nextra words", "8"),
    ("Therefore, the final answer is $\\frac{1}{2}$. I hope it is correct.", "$\\frac{1}{2}$"),
    ("Final Answer: x = 7.", "x = 7"),
    ("answer is 3.14", "3.14"),
    ("First 12, then 1,234 and finally -4.5 remain", "-4.5"),
    ("we need 3/4 of it", "3/4"),
    ("there are 2 cats and 10-3 dogs", "3"),  # "10-3": the minus is an operator, not a sign
    ("no numbers at all", None),
    ("", None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("answer, expected", [
    (r"$x = \dfrac12$.", r"\frac{1}{2}"),
    (r"\tfrac{1}{2}", r"\frac{1}{2}"),
    (r"\frac1{2}", r"\frac{1}{2}"),
    (r"\frac{1}2", r"\frac{1}{2}"),
    (r"\left( 1, 2 \right)", "(1,2)"),
    (r"10\%", "10"),
    (r"\$5", "5"),
    ("1,000", "1000"),
    (r"1{,}000", "1000"),
    ("(1,000)", "(1,000)"),  # a tuple, not a thousands separator
    (r"10\text{ inches}", "10"),
    (r"5\mbox{ cm}^2", "5"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    (r"\text{(C)}", "C"),
    (r"\text{Devon}", "Devon"),
    (".5", "0.5"),
    ("-.5", "-0.5"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"2\sqrt 3", r"2\sqrt{3}"),
    ("y = 2x + 3", "2x+3"),
    (r"\theta = 30", "30"),
    ("a = b = 1", "a=b=1"),  # only a single `var =` prefix is dropped
    (r"3\!\cdot\!4", r"3\cdot4"),
    ("1/2", r"\frac{1}{2}"),
    ("-1/2", r"-\frac{1}{2}"),
    (r"\boxed{4}", "4"),
    (r"\displaystyle\frac{1}{2}", r"\frac{1}{2}"),
    ("", ""),
    (None, ""),
])
def test_normalize(answer, expected):
    assert normalize(answer) == expected


@pytest.mark.parametrize("s, expected", [
    ("5", 5.0), ("-3", -3.0), ("+2", 2.0), ("0.25", 0.25), (".5", 0.5), ("5.00", 5.0), ("1/2", 0.5),
    ("-1/2", -0.5), (r"\frac{3}{4}", 0.75), (r"\frac34", 0.75), (r"-\frac{1}{4}", -0.25), (r"\dfrac{-1}{2}", -0.5),
    ("1,000", 1000.0), (r"10\%", 10.0), (r"\$5", 5.0), (r"\$1,234.50", 1234.5), (r"45^\circ", 45.0),
    (r"\sqrt{2}", None), (r"\pi", None), ("1/0", None), (r"\frac{1}{0}", None), ("abc", None), ("", None),
    ("(1,2)", None), ("1e5", None), ("9" * 400, None), (None, None),
])
def test_parse_number(s, expected):
    assert parse_number(s) == expected


@pytest.mark.parametrize("pred, ref", [
    (r"\frac12", r"\frac{1}{2}"),
    (r"\frac{1}{2}", "0.5"),
    ("1/2", r"\frac{1}{2}"),
    ("0.5", "1/2"),
    (r"\sqrt{2}", r"\sqrt2"),
    (r"10\%", "10"),
    (r"\$5", "5"),
    ("5.00", "5"),
    ("1,000", "1000"),
    ("(1,2)", "(1, 2)"),
    (r"(\frac12, 3)", "(0.5,3)"),
    ("[0, 1)", r"\left[ 0,1 \right)"),
    (r"\text{(B)}", "B"),
    ("x = 4", "4"),
    ("0.3333333333", r"\frac13"),
    (r"-\frac{2}{3}", r"\frac{-2}{3}"),
    ("1000000", "1,000,000.0"),
    (r"\dfrac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{2}"),
    ("007", "7"),
    (r"\sqrt{8}", r"2\sqrt{2}"),  # math-verify: symbolic algebra
    ("x+1", "1+x"),
    ("2^{10}", "1024"),
    ("1" * 5000, "1" * 5000),  # over Python's int-string limit: compared exactly as digits
    ("0" + "7" * 5000, "7" * 5000 + ".000"),
])
def test_equivalent(pred, ref):
    assert is_equivalent(pred, ref)
    assert is_equivalent(ref, pred)


@pytest.mark.parametrize("pred, ref", [
    ("0.333", r"\frac13"),
    ("5", "6"),
    ("(1,2)", "(2,1)"),
    ("(1,2)", "[1,2]"),
    ("(1,2)", "(1,2,3)"),
    (r"\sqrt{8}", "3"),
    ("123456789", "123456700"),  # integers are exact: no relative tolerance
    ("12345678901234567890", "12345678901234567891"),
    ("123456789.5", "123456789.4"),  # two finite decimals are exact too
    ("0", "0.0000000001"),
    (r"10\%", "0.1"),  # MATH's convention: a percentage is its number
    ("1" * 5000, "1" * 4999 + "2"),
    ("2^{10}", "1000"),
    ("", ""),
    (r"\boxed{}", r"\boxed{}"),
    (None, "5"),
    ("5", None),
    ("1.0000001e3", "1000"),
])
def test_not_equivalent(pred, ref):
    assert not is_equivalent(pred, ref)


def test_rel_tol_applies_only_to_a_decimal_that_rounds():
    """A decimal against a value with no finite decimal expansion (1/3) is compared within rel_tol; two finite
    decimals, or integers, never are."""
    assert is_equivalent("0.333", r"\frac13", rel_tol=1e-2) and not is_equivalent("0.333", r"\frac13")
    assert not is_equivalent("100.01", "100", rel_tol=1e-3)
    assert not is_equivalent("1001", "1000", rel_tol=1e-2)


@pytest.mark.parametrize("response, expected", [
    (r"... so the answer is $\boxed{B}$.", "B"),
    (r"\boxed{(C)}", "C"),
    (r"\boxed{\text{D}}", "D"),
    (r"\boxed{\text{(A) 4 m/s}}", "A"),
    (r"\boxed{B. 3 J}", "B"),
    ("The answer is (C).", "C"),
    ("Answer: **D**", "D"),
    ("I first thought (A), but the answer is B because...", "B"),
    ("The correct answer is option C", "C"),
    ("The Answer Is C", "C"),
    ("ANSWER: (D)", "D"),
    (r"The answer is \textbf{B}.", "B"),
    ("The answer is ***A***", "A"),
    ("B. Because momentum is conserved.", "B"),
    ("(D) since it is the only one", "D"),
    ("  C  ", "C"),
    ("Options (A) and (B) fail, so it must be (C) in the end", "C"),
    ("A ball falls freely.", None),  # "A" as an article
    ("The answer is E", None),
    (r"\boxed{42}", None),
    ("", None),
    (None, None),
])
def test_extract_choice(response, expected):
    assert extract_choice(response) == expected


def test_extract_choice_letters():
    assert extract_choice("The answer is (E).", letters="ABCDE") == "E"
    assert extract_choice("The answer is (E).") is None


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_nothing_raises_on_arbitrary_text(text):
    assert last_boxed(text) is None or isinstance(last_boxed(text), str)
    assert isinstance(normalize(text), str)
    assert isinstance(extract_gsm8k_reference(text), str)
    extract_answer(text)
    parse_number(text)
    assert isinstance(is_equivalent(text, "5"), bool)
    assert extract_choice(text) in (None, "A", "B", "C", "D")


_LATEXY = st.lists(st.sampled_from(list("\\{}$()[],.=/-+%^_ 0123456789abxABC\n") +
                                   [r"\boxed", r"\fbox", r"\frac", r"\sqrt", r"\text", r"\left", r"\right", r"\dfrac",
                                    "answer is ", "####", r"\%", r"\!", r"^\circ", "{,}"]),
                   max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(_LATEXY, _LATEXY)
def test_nothing_raises_on_latex_like_text(a, b):
    assert isinstance(is_equivalent(a, b), bool)
    extract_answer(a)
    extract_choice(a)
    parse_number(a)


@given(st.integers(-10**6, 10**6), st.integers(1, 10**4))
def test_fractions_match_their_decimal_value(num, den):
    assert is_equivalent(f"\\frac{{{num}}}{{{den}}}", repr(num / den))
    assert is_equivalent(f"{num}/{den}", f"\\dfrac{{{num}}}{{{den}}}")


@pytest.mark.parametrize("pathological", [
    "\\boxed{" * 20_000,
    "{" * 50_000 + "\\boxed",
    "\\frac{" * 10_000,
    "\\text{" * 10_000 + "1",
    "answer is " * 5_000,
    "1" * 50_000 + "x",
    "(" * 20_000,
])
def test_long_adversarial_responses_are_fast(pathological):
    start = time.perf_counter()
    extract_answer(pathological)
    is_equivalent(pathological, pathological + "1")
    extract_choice(pathological)
    assert time.perf_counter() - start < 2.0


def test_a_deadline_that_fires_inside_a_finaliser_still_stops_the_computation_and_reports_nothing():
    """The deadline's raise can land in a ``__del__`` (or a garbage-collector callback) running inside the
    computation, where Python cannot propagate it and passes it to ``sys.unraisablehook``; the timer fires again
    and stops the computation, and the lost raise is not reported (pytest would count the report as an error)."""
    from kl_lib.tasks.answers import _within_deadline

    class SlowFinaliser:
        def __del__(self):  # runs as soon as the object is dropped, and is still running at the deadline
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                pass

    def compute():
        SlowFinaliser()
        while True:
            pass

    reports, earlier = [], sys.unraisablehook
    sys.unraisablehook = reports.append
    try:
        start = time.monotonic()
        assert _within_deadline(compute, 0.1) is False
        elapsed = time.monotonic() - start
        assert sys.unraisablehook == reports.append  # the caller's hook is back
    finally:
        sys.unraisablehook = earlier
    assert reports == []
    assert elapsed < 1.5  # stopped by a later firing, not by the finaliser running out (2 s)
