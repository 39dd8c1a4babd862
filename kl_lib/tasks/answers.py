r"""Answer extraction and equivalence for math and multiple-choice tasks: what turns a response into a reward.

Extraction (:func:`extract_answer`), in this order, the first that finds something wins:

    1. the content of the last complete ``\boxed{…}`` / ``\fbox{…}`` (nested braces allowed), or ``\boxed 5``
    2. the rest of the line after the last ``####``                    (GSM8K's reference format)
    3. the rest of the sentence after the last "answer is" / "answer:"  ("The final answer is $\frac12$.")
    4. the last number in the text                                     (integers, decimals, ``a/b``, ``1,000``)

Equivalence (:func:`is_equivalent`): ``pred ≡ ref`` iff, after :func:`normalize`, the strings are equal, or both
parse as numbers (:func:`parse_number`) with ``|p − r| ≤ rel_tol · max(1, |p|, |r|)``, or both are tuples /
intervals with the same brackets whose elements are pairwise equivalent in that sense. :func:`normalize` follows the
MATH conventions of Hendrycks et al.'s ``is_equiv`` (strip ``$``, ``\left``/``\right``, ``\!``, spaces, degrees,
``\%``, trailing units in ``\text{…}``, ``\dfrac``/``\tfrac`` → ``\frac``, ``\frac12`` → ``\frac{1}{2}``,
``\sqrt2`` → ``\sqrt{2}``, ``a/b`` → ``\frac{a}{b}``, a single-variable ``x =`` prefix) plus thousands commas in a
lone number. Percentages compare by their number (``10\%`` ≡ ``10``, not 0.1), as in MATH.

Multiple choice (:func:`extract_choice`): the letter in the last ``\boxed{}``, else after the last "answer is",
else a letter opening the response ("B." / "(B)"), else the last "(C)" mentioned.

None of these functions raises on model output (any ``str``, or ``None``); the regular expressions have no nested
quantifiers, so they run in time linear in the response.

Departure from the paper: the paper does not say which verifier it used (math-verify, or a sympy-based checker as
in many RLVR codebases). This one is pure Python and deliberately conservative: it does no symbolic algebra, so
``\sqrt{8}`` and ``2\sqrt{2}`` are *not* equivalent, nor are ``x+1`` and ``1+x``; such answers score 0 here and
might score 1 under a symbolic checker. The last-number fallback (step 4) makes extraction lenient for responses
that ignore the ``\boxed{}`` instruction.
"""

from __future__ import annotations

import math
import re

__all__ = ["extract_answer", "extract_choice", "extract_gsm8k_reference", "is_equivalent", "last_boxed", "normalize",
           "parse_number"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BOX_COMMAND = re.compile(r"\\boxed|\\fbox")


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
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        content = _box_content_at(text, match.start(), match.group(), pairs)
        if content is not None:
            return content
    return None


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


def normalize(answer: str) -> str:
    r"""A canonical string for an answer, for exact comparison (MATH's conventions; see the module docstring).

    >>> normalize(r"$x = \dfrac12$.")
    '\\frac{1}{2}'
    """
    if not isinstance(answer, str):
        return ""
    s = answer.strip()
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
    if s.startswith("."):
        s = "0" + s
    elif s.startswith("-."):
        s = "-0" + s[1:]
    letter = re.fullmatch(r"\(([A-Z])\)", s)
    if letter:
        s = letter.group(1)
    return s


def _number_of_normalized(s: str) -> float | None:
    if not s or len(s) > 200:
        return None
    value = None
    if _DECIMAL.fullmatch(s):
        value = float(s)
    elif (frac := _FRAC.fullmatch(s)) or (frac := _SLASH.fullmatch(s)):
        num, den = float(frac.group(2)), float(frac.group(3))
        if den != 0:
            value = (-1.0 if frac.group(1) == "-" else 1.0) * num / den
    if value is None or not math.isfinite(value):
        return None
    return value


def parse_number(s: str) -> float | None:
    r"""The number an answer string denotes, or None: integers, decimals, ``a/b``, ``\frac{a}{b}``, ``-\frac12``,
    ``1,000``, ``10\%`` (→ 10.0), ``\$5``; anything symbolic (``\sqrt{2}``, ``\pi``) is None."""
    return _number_of_normalized(normalize(s))


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


def _close(a: float, b: float, rel_tol: float) -> bool:
    return abs(a - b) <= rel_tol * max(1.0, abs(a), abs(b))


def _equivalent_normalized(a: str, b: str, rel_tol: float) -> bool:
    if a == b:
        return True
    x, y = _number_of_normalized(a), _number_of_normalized(b)
    return x is not None and y is not None and _close(x, y, rel_tol)


def is_equivalent(pred: str | None, ref: str | None, rel_tol: float = 1e-6) -> bool:
    r"""Whether a predicted answer matches the reference: equal after :func:`normalize`, numerically within
    ``rel_tol`` (relative, with an absolute floor of ``rel_tol`` near 0), or tuples / intervals that match element
    by element. An empty or missing answer never matches."""
    if not isinstance(pred, str) or not isinstance(ref, str):
        return False
    a, b = normalize(pred), normalize(ref)
    if not a or not b:
        return False
    if _equivalent_normalized(a, b, rel_tol):
        return True
    # tuples and intervals: same brackets, same length, elementwise equivalent
    if len(a) >= 2 and len(b) >= 2 and a[0] == b[0] and a[-1] == b[-1] and a[0] in "([" and a[-1] in ")]":
        xs, ys = _split_top_level(a[1:-1]), _split_top_level(b[1:-1])
        return len(xs) == len(ys) >= 2 and all(_equivalent_normalized(x, y, rel_tol) for x, y in zip(xs, ys))
    return False


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------------

def extract_choice(response: str, letters: str = "ABCD") -> str | None:
    r"""The option letter a multiple-choice response picks, or None (letters are upper case only).

    In order: the letter in the last ``\boxed{}`` (``\boxed{B}``, ``\boxed{(B)}``, ``\boxed{\text{B. 4 m}}``);
    after the last "answer is" / "answer:" (``The answer is (B)``, ``Answer: **C**``); a letter opening the
    response (``B. …``, ``(B) …``, a bare ``B``); the last parenthesised mention (``… so (C)``).
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
    matches = re.findall(rf"(?i:answer)(?:\s+is|\s*:)(?:\s|\*\*|\$|\\text\{{|(?i:option|choice)\s|\(|\[|:)*"
                         rf"({cls})(?![A-Za-z0-9])", response)
    if matches:
        return matches[-1]
    match = re.match(rf"\s*\(?({cls})(?:[.):]|\s*$)", response)
    if match:
        return match.group(1)
    matches = re.findall(rf"\(({cls})\)", response)
    return matches[-1] if matches else None
