r"""Answer extraction and equivalence for math and multiple-choice tasks: what turns a response into a reward.

Extraction (:func:`extract_answer`), in this order, the first that finds something wins:

    1. the content of the last complete ``\boxed{…}`` / ``\fbox{…}`` (nested braces allowed), or ``\boxed 5``
    2. the rest of the line after the last ``####``                    (GSM8K's reference format)
    3. the rest of the sentence after the last "answer is" / "answer:"  ("The final answer is $\frac12$.")
    4. the last number in the text                                     (integers, decimals, ``a/b``, ``1,000``)

Digits (one rule for every task: arithmetic, chat arithmetic, Countdown, MATH/GSM8K): every Unicode decimal digit
(category Nd: Arabic-Indic ``٣``, fullwidth ``３``, Devanagari ``३``, …) counts as its ASCII digit
(:func:`ascii_digits`), and nothing else of the text is changed. Full NFKC normalisation is deliberately not
applied: it turns superscripts and fractions into digits (``10²`` → ``102``, ``½`` → ``1⁄2``), which changes what
an answer says.

Equivalence (:func:`is_equivalent`), ``pred`` against the reference ``ref``, after :func:`normalize` (MATH's
conventions, from Hendrycks et al.'s ``is_equiv``: strip ``$``, ``\left``/``\right``, ``\!``, spaces, degrees,
``\%``, trailing units in ``\text{…}``, ``\dfrac``/``\tfrac`` → ``\frac``, ``\frac12`` → ``\frac{1}{2}``,
``\sqrt2`` → ``\sqrt{2}``, ``a/b`` → ``\frac{a}{b}``, a single-variable ``x =`` prefix, thousands commas in a lone
number; a plain decimal is written canonically: ``007`` → ``7``, ``5.00`` → ``5``, ``.5`` → ``0.5``):

    1. equal strings are equivalent (exact at any length);
    2. two numbers (integers, decimals, ``a/b``, ``\frac{a}{b}``, a percentage as its number) are compared
       *exactly* as rationals, and that verdict is final: ``123456789`` ≢ ``123456700``, ``0`` ≢ ``0.0000000001``,
       ``10\%`` ≡ ``10`` but ≢ ``0.1`` (MATH's convention). The one tolerance is for a decimal against a value
       with no finite decimal expansion, which the decimal can only round: ``0.3333333333`` ≡ ``\frac13`` iff
       ``|p − r| ≤ rel_tol · max(1, |p|, |r|)`` (``0.333`` is not). Numbers over :data:`MAX_NUMBER_DIGITS`
       characters are not parsed (Python's ``int()`` refuses 4,300 digits) and compare by rule 1 only;
    3. tuples / intervals with the same brackets match element by element by rules 1–2; when every element of
       both is a number, that verdict is final (``(1,2)`` ≢ ``[1,2]``, ``(1,2)`` ≢ ``(2,1)``);
    4. anything else goes to math-verify (Hugging Face's checker, the one TRL uses) with ``ref`` as its gold:
       symbolic equality (``\sqrt{8}`` ≡ ``2\sqrt{2}``, ``x+1`` ≡ ``1+x``, ``2^{10}`` ≡ ``1024``, sets), within
       :data:`SYMBOLIC_SECONDS`; a comparison that fails or does not finish in time counts as not equivalent, and
       answers over :data:`MAX_SYMBOLIC_CHARS` characters are not given to it.

math-verify's own timeouts use ``signal.alarm`` and raise outside the main thread, so they are switched off and
:func:`symbolic_equal` bounds the whole parse-and-verify itself: in the main thread with a ``SIGALRM`` interval
timer (a timer the caller had armed is re-armed afterwards with what was left of it), in any other thread by
handing the comparison to a helper process that runs it in its own main thread and is killed if it does not
answer in time.

Multiple choice (:func:`extract_choice`): the letter in the last ``\boxed{}``, else after the last "answer is"
(any case: "The Answer Is C"), else a letter opening the response ("B." / "(B)"), else the last "(C)" mentioned.

None of these functions raises on model output (any ``str``, or ``None``); the regular expressions have no nested
quantifiers, so they run in time linear in the response.

Departure from the paper: the paper does not say which verifier it used. Here the extraction is the project's
(it reads nested boxes, GSM8K's ``####`` and unboxed answers, where math-verify's is stricter), numbers are exact
(math-verify rounds decimals to 6 places and reads ``10\%`` as 0.1), and math-verify decides only what needs
symbolic algebra. The last-number fallback (step 4) makes extraction lenient for responses that ignore the
``\boxed{}`` instruction.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from fractions import Fraction

__all__ = ["MAX_NUMBER_DIGITS", "MAX_SYMBOLIC_CHARS", "SYMBOLIC_SECONDS", "ascii_digits", "canonical_integer",
           "extract_answer", "extract_choice", "extract_gsm8k_reference", "integer_reward", "is_equivalent",
           "last_boxed", "normalize", "parse_number", "symbolic_equal"]

MAX_NUMBER_DIGITS = 4000  # longest number parsed as a rational (Python's int() refuses strings over 4,300 digits)
MAX_SYMBOLIC_CHARS = 1000  # longest answer given to math-verify
SYMBOLIC_SECONDS = 2.0  # time math-verify has for one comparison (parsing both answers and verifying)


@functools.cache
def _digit_table() -> dict[int, int]:
    """Every non-ASCII Unicode decimal digit (650 of them) -> its ASCII digit, for ``str.translate`` (built once)."""
    every_character = "".join(map(chr, range(128, sys.maxunicode + 1)))
    return {ord(c): ord("0") + int(c) for c in re.findall(r"\d", every_character)}


def ascii_digits(text: str) -> str:
    """``text`` with every Unicode decimal digit replaced by its ASCII digit (``٣`` → ``3``, ``３`` → ``3``)."""
    return text if text.isascii() else text.translate(_digit_table())


_INTEGER = re.compile(r"-?\d+")


def canonical_integer(text: str | None) -> str | None:
    """``text`` as canonical integer text if, spaces around it aside, it is one integer ``-?digits`` (``" -012 "`` →
    ``"-12"``, ``"-0"`` → ``"0"``), else None. Exact at any length: no ``int()``, which refuses 4,300 digits."""
    if not isinstance(text, str):
        return None
    text = ascii_digits(text).strip()
    if not _INTEGER.fullmatch(text):
        return None
    sign, digits = ("-", text[1:]) if text[0] == "-" else ("", text)
    digits = digits.lstrip("0") or "0"
    return "0" if digits == "0" else sign + digits


def integer_reward(stated: str | None, answer: str, finished: bool) -> float:
    """1.0 if the response finished and ``stated`` (its answer text) is the integer ``answer``, else 0.0; exact."""
    expected = canonical_integer(answer)
    return float(bool(finished) and expected is not None and canonical_integer(stated) == expected)


_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


def _brace_pairs(text: str) -> dict[int, int]:
    """``{open index: close index}`` for every matched brace in one linear pass; ``\\{``/``\\}`` are not braces."""
    pairs, stack = {}, []
    for token in _BRACE_TOKEN.finditer(text):
        char = token.group()
        if char == "{":
            stack.append(token.start())
        elif char == "}" and stack:
            pairs[stack.pop()] = token.start()
    return pairs


_BOX_SPACE_ARG = re.compile(r"[^$\n]*")


def _box_content_at(text: str, start: int, command: str, pairs: dict[int, int]) -> str | None:
    """Content of the box command at ``text[start:]``, or None if it is not a complete box."""
    i = start + len(command)
    if i < len(text) and text[i].isalpha():  # "\boxedfoo" is another command
        return None
    j = i
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        close = pairs.get(j)
        return None if close is None else text[j + 1:close]
    if j > i and command == "\\boxed":  # "\boxed 5": up to the closing "$" or the end of the line (MATH's rule)
        content = _BOX_SPACE_ARG.match(text, j).group().strip()
        return content or None
    return None


def last_boxed(text: str) -> str | None:
    r"""The content of the last complete ``\boxed{…}`` or ``\fbox{…}`` in ``text`` (or ``\boxed 5``), else None.

    Braces nest (``\boxed{\frac{1}{2}}`` → ``\frac{1}{2}``); an unclosed box (a truncated response) is skipped
    in favour of an earlier complete one.
    """
    if not isinstance(text, str) or not any(cmd in text for cmd in _BOX_COMMANDS):
        return None
    pairs = _brace_pairs(text)
    last = {command: text.rfind(command) for command in _BOX_COMMANDS}  # the last of each not yet tried
    while True:
        command = max(last, key=last.get)
        if last[command] < 0:
            return None
        content = _box_content_at(text, last[command], command, pairs)
        if content is not None:
            return content
        last[command] = text.rfind(command, 0, last[command])


def extract_gsm8k_reference(solution: str) -> str:
    """GSM8K's reference answer: the text after the last ``####`` of the solution, stripped ("" if none)."""
    if not isinstance(solution, str) or "####" not in solution:
        return ""
    return solution.rsplit("####", 1)[1].strip()


_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?[ \t]*([^\n]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?")


def extract_answer(response: str) -> str | None:
    """The final answer a response states, or None; see the module docstring for the order of the rules."""
    if not isinstance(response, str):
        return None
    response = ascii_digits(response)
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    if "####" in response:
        tail = response.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        if tail:
            return tail
    matches = _ANSWER_IS.findall(response)
    for candidate in reversed(matches):
        candidate = _SENTENCE_END.split(candidate, maxsplit=1)[0].strip().rstrip(".").strip()
        if candidate:
            return candidate
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


# ---------------------------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------------------------

_TEXT_COMMANDS = ("\\text", "\\textbf", "\\textrm", "\\textit", "\\mbox", "\\mathrm", "\\mathbf")
_UNIT_SUFFIX = re.compile(r"\s*[A-Za-z][A-Za-z ]*\}(?:\^\{?\d\}?)?")
_UNIT_AFTER = set("0123456789}")
_SINGLE_VARIABLE = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?$")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_INT_SLASH_INT = re.compile(r"(-?)(\d+)/(\d+)")
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_DECIMAL = re.compile(_NUM)
_FRAC = re.compile(rf"([-+]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_SLASH = re.compile(rf"()({_NUM})/({_NUM})")


def _unwrap(text: str, command: str) -> str:
    r"""Replace every ``\command{X}`` by ``X`` (outermost occurrences, left to right)."""
    if command + "{" not in text:
        return text
    pairs = _brace_pairs(text)
    out, i = [], 0
    while True:
        start = text.find(command + "{", i)
        close = pairs.get(start + len(command)) if start >= 0 else None
        if close is None:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:start])
        out.append(text[start + len(command) + 1:close])
        i = close + 1


def _read_argument(text: str, i: int, pairs: dict[int, int]) -> tuple[str, int] | None:
    """One LaTeX macro argument at ``text[i:]`` (``{…}`` or a single character): (content, next index)."""
    if i >= len(text):
        return None
    if text[i] == "{":
        close = pairs.get(i)
        return None if close is None else (text[i + 1:close], close + 1)
    if text[i] in "}\\^_":
        return None
    return text[i], i + 1


def _brace_arguments(text: str, command: str, nargs: int) -> str:
    r"""Rewrite ``\frac12`` / ``\frac1{2}`` as ``\frac{1}{2}`` and ``\sqrt2`` as ``\sqrt{2}`` (no spaces in ``text``)."""
    if command not in text:
        return text
    pairs = _brace_pairs(text)
    out, i = [], 0
    while True:
        start = text.find(command, i)
        if start < 0:
            out.append(text[i:])
            return "".join(out)
        j = start + len(command)
        if j < len(text) and text[j].isalpha():  # a longer command name, e.g. \fracfoo
            out.append(text[i:j])
            i = j
            continue
        args = []
        for _ in range(nargs):
            arg = _read_argument(text, j, pairs)
            if arg is None:
                break
            args.append(arg[0])
            j = arg[1]
        out.append(text[i:start])
        if len(args) == nargs:
            out.append(command + "".join("{" + a + "}" for a in args))
            i = j
        else:
            out.append(command)
            i = start + len(command)


def _strip_trailing_unit(s: str) -> str:
    r"""``10\text{ inches}`` → ``10``, ``5\mbox{cm}^2`` → ``5``: a word in a text box after a number is a unit."""
    for command in ("\\text{", "\\mbox{", "\\mathrm{", "\\textrm{"):
        start = s.rfind(command)
        if start > 0 and _UNIT_SUFFIX.fullmatch(s, start + len(command)) and s[:start].rstrip()[-1:] in _UNIT_AFTER:
            return s[:start].rstrip()
    return s


def _canonical_decimal(s: str) -> str:
    """A plain decimal without sign clutter or padding: ``+007`` → ``7``, ``-.50`` → ``-0.5``, ``-0.0`` → ``0``."""
    sign = s[0] if s[0] in "+-" else ""
    whole, _, fraction = s[len(sign):].partition(".")
    text = (whole.lstrip("0") or "0") + ("." + fraction.rstrip("0") if fraction.rstrip("0") else "")
    return "-" + text if sign == "-" and text != "0" else text


def normalize(answer: str) -> str:
    r"""A canonical string for an answer, for exact comparison (MATH's conventions; see the module docstring).

    >>> normalize(r"$x = \dfrac12$.")
    '\\frac{1}{2}'
    """
    if not isinstance(answer, str):
        return ""
    s = ascii_digits(answer).strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    for old, new in (("\n", ""), ("\\!", ""), ("\\displaystyle", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("°", ""),
                     ("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("{,}", ",")):
        s = s.replace(old, new)
    s = s.strip()
    s = _strip_trailing_unit(s)
    for command in _TEXT_COMMANDS:
        s = _unwrap(s, command)
    for old in ("\\,", "\\;", "\\:", "\\ ", "~"):
        s = s.replace(old, "")
    s = "".join(s.split())
    s = s.rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if s.count("=") == 1:
        left, right = s.split("=")
        if _SINGLE_VARIABLE.fullmatch(left):
            s = right
    s = _brace_arguments(s, "\\frac", 2)
    s = _brace_arguments(s, "\\sqrt", 1)
    slash = _INT_SLASH_INT.fullmatch(s)
    if slash:
        s = f"{slash.group(1)}\\frac{{{slash.group(2)}}}{{{slash.group(3)}}}"
    if _DECIMAL.fullmatch(s):
        s = _canonical_decimal(s)
    letter = re.fullmatch(r"\(([A-Z])\)", s)
    if letter:
        s = letter.group(1)
    return s


# ---------------------------------------------------------------------------------------------------------------
# Equivalence: exact numbers, then math-verify
# ---------------------------------------------------------------------------------------------------------------

def _rational(s: str) -> Fraction | None:
    r"""The exact value of a normalized number (a decimal, ``a/b``, ``\frac{a}{b}``), or None."""
    if not s or len(s) > MAX_NUMBER_DIGITS:
        return None
    if _DECIMAL.fullmatch(s):
        return Fraction(s)
    parts = _FRAC.fullmatch(s) or _SLASH.fullmatch(s)
    if parts is None or Fraction(parts.group(3)) == 0:
        return None
    value = Fraction(parts.group(2)) / Fraction(parts.group(3))
    return -value if parts.group(1) == "-" else value


def parse_number(s: str) -> float | None:
    r"""The number an answer string denotes, or None: integers, decimals, ``a/b``, ``\frac{a}{b}``, ``-\frac12``,
    ``1,000``, ``10\%`` (→ 10.0), ``\$5``; anything symbolic (``\sqrt{2}``, ``\pi``) or beyond a float is None."""
    value = _rational(normalize(s))
    try:
        return None if value is None else float(value)
    except OverflowError:
        return None


def _terminates(x: Fraction) -> bool:
    """Whether ``x`` has a finite decimal expansion (its denominator has no prime factor but 2 and 5)."""
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _numbers_equal(a: str, x: Fraction, b: str, y: Fraction, rel_tol: float) -> bool:
    """Exactly equal, or a decimal (``a`` or ``b``) within ``rel_tol`` of a value it can only round."""
    if x == y:
        return True
    rounds = ("." in a and not _terminates(y)) or ("." in b and not _terminates(x))
    return rounds and abs(x - y) <= Fraction(rel_tol) * max(1, abs(x), abs(y))


def _flat_verdict(a: str, b: str, rel_tol: float) -> bool | None:
    """Rules 1-2 of the module docstring on normalized answers: the verdict, or None when they do not decide."""
    if a == b:
        return True
    x, y = _rational(a), _rational(b)
    return _numbers_equal(a, x, b, y, rel_tol) if x is not None and y is not None else None


def _split_top_level(s: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in s:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _items(s: str) -> list[str] | None:
    """The elements of a bracketed tuple / interval ``(a,b,…)`` / ``[a,b)``, or None if ``s`` is not one."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    items = _split_top_level(s[1:-1])
    return items if len(items) >= 2 else None


def _exact_verdict(a: str, b: str, rel_tol: float) -> bool | None:
    """Rules 1-3 of the module docstring on normalized answers: the verdict, or None to ask math-verify."""
    verdict = _flat_verdict(a, b, rel_tol)
    if verdict is not None:
        return verdict
    xs, ys = _items(a), _items(b)
    if xs is None or ys is None:
        return None
    same_shape = a[0] + a[-1] == b[0] + b[-1] and len(xs) == len(ys)
    if same_shape and all(_flat_verdict(x, y, rel_tol) for x, y in zip(xs, ys)):
        return True
    if all(_rational(item) is not None for item in xs + ys):  # tuples of numbers are decided here
        return False
    return None


def is_equivalent(pred: str | None, ref: str | None, rel_tol: float = 1e-6) -> bool:
    r"""Whether a predicted answer matches the reference (see the module docstring for the rules): equal after
    :func:`normalize`, the same number exactly (a decimal within ``rel_tol``, relative, of a value with no finite
    decimal expansion), tuples / intervals that match element by element, or equal to math-verify. An empty or
    missing answer never matches. Never raises."""
    if not isinstance(pred, str) or not isinstance(ref, str):
        return False
    a, b = normalize(pred), normalize(ref)
    if not a or not b:
        return False
    verdict = _exact_verdict(a, b, rel_tol)
    return verdict if verdict is not None else symbolic_equal(pred, ref)


class _OutOfTime(BaseException):
    """Raised by the interval timer inside math-verify; a BaseException, so that sympy's ``except Exception``
    clauses cannot swallow it."""


_RETRY_SECONDS = 0.05  # after the deadline the timer fires again at this interval until the computation stops


def _within_deadline(compute: Callable[[], bool], seconds: float) -> bool:
    """``compute()`` (a Python function) in the main thread, stopped by ``SIGALRM`` after ``seconds``: False if
    stopped or if it raises. The timer keeps firing every ``_RETRY_SECONDS`` until ``compute`` has returned, since
    one raise can be lost (an exception inside a garbage-collector callback or a ``__del__`` is only reported, to
    ``sys.unraisablehook``: such a lost ``_OutOfTime`` is dropped here instead of reported, since the next firing
    stops ``compute``), and it raises only while ``compute`` is on the stack, so that the clean-up here cannot be
    interrupted. An interval timer the caller had armed is re-armed afterwards with what was left of it."""
    def stop(signum, frame):
        while frame is not None:
            if frame.f_code is compute.__code__:
                raise _OutOfTime
            frame = frame.f_back

    earlier_hook = sys.unraisablehook

    def drop_lost_stop(unraisable) -> None:
        if not isinstance(unraisable.exc_value, _OutOfTime):
            earlier_hook(unraisable)

    sys.unraisablehook = drop_lost_stop
    earlier_handler = signal.signal(signal.SIGALRM, stop)
    earlier_delay, earlier_interval = signal.setitimer(signal.ITIMER_REAL, seconds, _RETRY_SECONDS)
    start = time.monotonic()
    try:
        return bool(compute())
    except (_OutOfTime, Exception):  # noqa: BLE001  sympy may raise anything on a bad answer: not equivalent
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if earlier_handler is None else earlier_handler)
        sys.unraisablehook = earlier_hook
        if earlier_delay > 0:
            left = max(earlier_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, earlier_interval)


class _NoTimeoutNotice(logging.Filter):
    """Drop math-verify's notice that its own timeouts are off: :func:`symbolic_equal` bounds the time itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@functools.cache
def _math_verify():
    import math_verify  # imported on first use: it loads sympy (~1 s), which only the MATH-style rewards need

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_NoTimeoutNotice())
    return math_verify


def _math_verify_equal(pred: str, ref: str) -> bool:
    mv = _math_verify()
    gold = mv.parse("\\boxed{" + ascii_digits(ref) + "}", parsing_timeout=None)
    answer = mv.parse("\\boxed{" + ascii_digits(pred) + "}", parsing_timeout=None)
    return mv.verify(gold, answer, timeout_seconds=None)


def symbolic_equal(pred: str, ref: str) -> bool:
    """math-verify's verdict on ``pred`` against the gold answer ``ref``, both as they would stand in a
    ``\\boxed{}``; False if either is over :data:`MAX_SYMBOLIC_CHARS` characters, fails to parse, raises or takes
    over :data:`SYMBOLIC_SECONDS`. Safe in any thread (see the module docstring); never raises."""
    if not isinstance(pred, str) or not isinstance(ref, str) or max(len(pred), len(ref)) > MAX_SYMBOLIC_CHARS:
        return False
    if threading.current_thread() is threading.main_thread():
        _math_verify()  # the first import is not part of the comparison's time
        return _within_deadline(lambda: _math_verify_equal(pred, ref), SYMBOLIC_SECONDS)
    return _WORKER.ask(pred, ref)


class _SymbolicWorker:
    """A helper process that answers :func:`symbolic_equal` in its own main thread (where ``SIGALRM`` works), for
    callers in other threads: one JSON line ``[pred, ref]`` in, ``1`` or ``0`` out. Started on first use, killed
    (and restarted by the next call) when it does not answer in time."""

    SOURCE = ("import json, sys\n"
              "from kl_lib.tasks.answers import symbolic_equal\n"
              "print('ready', flush=True)\n"
              "for line in sys.stdin:\n"
              "    print(int(symbolic_equal(*json.loads(line))), flush=True)\n")
    STARTUP_SECONDS = 120.0  # importing kl_lib and sympy on a busy machine
    ANSWER_SECONDS = SYMBOLIC_SECONDS + 5.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def ask(self, pred: str, ref: str) -> bool:
        with self._lock:
            try:
                if self._process is None or self._process.poll() is not None:
                    self._start()
                self._process.stdin.write(json.dumps([pred, ref]) + "\n")
                self._process.stdin.flush()
                return self._read_line(self.ANSWER_SECONDS) == "1"
            except (OSError, ValueError):  # a broken pipe; the worker is restarted by the next call
                self._stop()
                return False

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen([sys.executable, "-c", self.SOURCE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        if self._read_line(self.STARTUP_SECONDS) != "ready":
            raise OSError("the math-verify helper process did not start")

    def _read_line(self, seconds: float) -> str | None:
        """The worker's next line, or None (and the worker stopped) if none comes within ``seconds``."""
        ready, _, _ = select.select([self._process.stdout], [], [], seconds)
        line = self._process.stdout.readline() if ready else ""
        if not line:
            self._stop()
            return None
        return line.strip()

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


_WORKER = _SymbolicWorker()


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------------

_CHOICE_WRAPPERS = "|".join(command[1:] for command in _TEXT_COMMANDS)


def extract_choice(response: str, letters: str = "ABCD") -> str | None:
    r"""The option letter a multiple-choice response picks, or None (letters are upper case only).

    In order: the letter in the last ``\boxed{}`` (``\boxed{B}``, ``\boxed{(B)}``, ``\boxed{\text{B. 4 m}}``);
    after the last "answer is" / "answer:", in any case (``The answer is (B)``, ``Answer: **C**``,
    ``The Answer Is \textbf{C}``); a letter opening the response (``B. …``, ``(B) …``, a bare ``B``); the last
    parenthesised mention (``… so (C)``).
    """
    if not isinstance(response, str) or not isinstance(letters, str) or not letters:
        return None
    cls = "[" + re.escape(letters) + "]"
    boxed = last_boxed(response)
    if boxed is not None:
        content = boxed
        for command in _TEXT_COMMANDS:
            content = _unwrap(content, command)
        match = re.match(rf"\s*[(\[]?\s*({cls})\s*[)\]]?(?=$|[\s.:)\]])", content)
        if match:
            return match.group(1)
    matches = re.findall(rf"(?i:answer(?:\s+is|\s*:))(?:\s|\*|\$|\\(?:{_CHOICE_WRAPPERS})\{{|(?i:option|choice)\s|"
                         rf"\(|\[|:)*({cls})(?![A-Za-z0-9])", response)
    if matches:
        return matches[-1]
    match = re.match(rf"\s*\(?({cls})(?:[.):]|\s*$)", response)
    if match:
        return match.group(1)
    matches = re.findall(rf"\(({cls})\)", response)
    return matches[-1] if matches else None
