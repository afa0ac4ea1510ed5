"""Find and mask personal data in call text: card numbers and their security codes, IBANs, phone
numbers, e-mail addresses and national-id-like numbers.

Used by ingest (on by default: nothing personal is stored, shown or analysed), the crm service
(on by default: nothing personal leaves for the CRM) and the analyze service (optionally, for
other callers of Analyze: nothing personal reaches the LLM). Each finding is replaced
by a placeholder such as ``[CARD_NUMBER]``; what is returned says which kind was found
and where the placeholder now stands, never the value.

Speech recognisers write numbers their own way ("4,111,111,111,111,111", "655 12 34 56",
"john.smith at example.com"), so digit runs may be broken by spaces, commas, dots and
hyphens, and e-mail addresses may be spoken. Checks that guard against false alarms:
the Luhn checksum for cards, ISO 13616 mod-97 for IBANs, the control letter of Spanish
DNI/NIE numbers. A card's security code (CVV, CVC) is three or four digits like any other, so it
is masked where it is named just before ("the security code is 123"), and so is any number said right after its
name ("card number", "phone number"), whichever way it was broken up or spelled out in words. A card read out with
no name before it ("4111, 1111, 1111, 1111", "four one one one, …") is found by its Luhn checksum over groups
read together (a list of numbers that passes it by chance, one in ten, is masked too). A long number that is
neither a valid card nor a phone number is still masked, as an account number: a recogniser's
error in one digit must not leak the rest. Text masked before is masked again as it is: a placeholder
is found as the kind it names.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass
from itertools import islice

CARD_NUMBER = "CARD_NUMBER"
IBAN = "IBAN"
PHONE_NUMBER = "PHONE_NUMBER"
EMAIL_ADDRESS = "EMAIL_ADDRESS"
NATIONAL_ID = "NATIONAL_ID"
ACCOUNT_NUMBER = "ACCOUNT_NUMBER"
SECURITY_CODE = "SECURITY_CODE"
KINDS = (CARD_NUMBER, IBAN, PHONE_NUMBER, EMAIL_ADDRESS, NATIONAL_ID, ACCOUNT_NUMBER, SECURITY_CODE)


@dataclass(frozen=True)
class Finding:
    """One masked value: its kind and the placeholder's place in the masked text (no value)."""

    kind: str
    start: int
    end: int


# A value masked before (by ingest, before it stored the transcript): found again as what it was, so that masking
# twice gives the same text and the same findings.
_PLACEHOLDER = re.compile(r"\[(" + "|".join(KINDS) + r")\]")
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
# Spoken: "john dot smith at example dot com", "juan punto perez arroba correo punto es".
_DOT = r"(?:\.|\s+(?:dot|punto|point|punkt|ponto)\s+)"
_SPOKEN_EMAIL = re.compile(
    rf"\b[\w+-]+(?:{_DOT}[\w+-]+)*\s+(?:at|arroba|arobase|chiocciola|ät)\s+[\w-]+(?:{_DOT}[\w-]+)*"
    rf"{_DOT}(?:com|net|org|edu|gov|info|io|co|uk|es|fr|de|it|pt|nl|eu|mx|ar|br)\b", re.IGNORECASE)
_IBAN = re.compile(r"\b[A-Z]{2}\s?\d{2}(?:[\s-]?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
_UK_NINO = re.compile(r"\b[A-CEGHJ-PR-TW-Z]{2}\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b")
_ES_ID = re.compile(r"\b(?:([XYZ])[\s-]?)?(\d{7,8})[\s-]?([A-Z])\b")
# Digits, possibly grouped by single spaces, commas, dots or hyphens; an optional leading + or (.
_DIGIT_RUN = re.compile(r"(?<![\w.,$€£¥])\+?\(?\d(?:(?:[\s.,()-]|\)\s?)?\d)+\b")
# Not personal: dates (25.11.2026, 2026-11-25) and amounts with thousands separators (1,250,000.00).
_DATE = re.compile(r"\d{1,2}[./-]\d{1,2}[./-]\d{2,4}|\d{4}-\d{1,2}-\d{1,2}")
_AMOUNT = re.compile(r"\d{1,3}(?:,\d{3}){1,2}(?:\.\d{1,2})?|\d{1,3}(?:\.\d{3}){1,2}(?:,\d{1,2})?")

# A digit as Whisper may write it when it is read out one by one: a figure, or its word in the languages of the
# evaluation set ("seven four two", "seis cinco cinco"; German "zwo", as two is said on the phone).
_DIGIT_VALUES = {word: str(value) for value, words in enumerate((
    "zero oh cero zéro null", "one uno una un une eins um uma", "two dos deux zwei zwo due dois duas",
    "three tres trois drei tre três", "four cuatro quatre vier quattro quatro", "five cinco cinq fünf cinque",
    "six seis sechs sei", "seven siete sept sieben sette sete", "eight ocho huit acht otto oito",
    "nine nueve neuf neun nove")) for word in words.split()}
_DIGIT_WORDS = "|".join(_DIGIT_VALUES)
_DIGIT = rf"(?:\d|\b(?:{_DIGIT_WORDS})\b)"
# What may stand between a number's name and the number: "is", "es el", "on the back,".
_GAP = r"\b\D{0,25}?"

# A payment card's security code, which PCI DSS forbids keeping once a payment is authorised: the three or four
# digits said within a few words after its name, or a word of three or four characters with two digits or more
# where Whisper misheard one ("the security code is i87" for nine eight seven).
_SECURITY_CODE = re.compile(
    r"\b(?:cvv2?|cvc2?|cv2|security (?:code|number)|card verification (?:code|value|number)|"
    r"(?:three|four|3|4) (?:digits|numbers) on the back|código de seguridad|code de sécurité|cryptogramme|"
    rf"prüfnummer|sicherheitscode|codice di sicurezza|código de segurança){_GAP}"
    rf"(?<!\w)({_DIGIT}(?:[\s,-]{{0,2}}{_DIGIT}){{2,3}}|(?=(?:[^\W\d]*\d){{2}})\w{{3,4}})(?!\w)",
    re.IGNORECASE)

# A number said right after its name is that number, however Whisper broke it up: a card read in groups
# ("4111, 1111, 111, 113"), as thousands ("5,000, 555,000, …") or in words ("seis cinco cinco, uno dos tres").
# Each name comes with the kind it is masked as and the fewest digits such a number has.
_NUMBER = rf"(?<!\w)({_DIGIT}(?:[\s,.-]{{0,3}}{_DIGIT})*)(?!\w)"
_NAMED_NUMBERS = (
    (re.compile(r"\b(?:card number|card no|long number on the (?:front|card)|n[úu]mero de (?:la |su |mi )?tarjeta|"
                r"num[ée]ro de (?:la |votre |ma )?carte|kartennummer|numero (?:della |di |de )?carta|"
                rf"n[úu]mero do cart[ãa]o){_GAP}{_NUMBER}", re.IGNORECASE), CARD_NUMBER, 8),
    (re.compile(r"\b(?:(?:tele)?phone number|mobile number|cell number|call me (?:back )?on|"
                r"n[úu]mero de (?:tel[ée]fonos?|m[óo]vil|celular|telefone)|"
                r"num[ée]ro de (?:t[ée]l[ée]phone|portable)|"
                rf"telefonnummer|handynummer|numero di (?:telefono|cellulare)){_GAP}{_NUMBER}", re.IGNORECASE),
     PHONE_NUMBER, 7),
)
_DIGIT_TOKEN = re.compile(_DIGIT, re.IGNORECASE)
# A card number read out with nothing to name it ("4111, 1111, 1111, 1111", "four one one one, …"): Whisper
# writes each breath's group apart, so no one run of digits holds the card. Groups of figures or digit words,
# a few separators apart, are read together; see :func:`_grouped_cards`.
_GROUPED_RUN = re.compile(rf"(?<![\w.,$€£¥]){_DIGIT}(?:[\s,.-]{{0,3}}{_DIGIT})+(?!\w)", re.IGNORECASE)
_GROUP = re.compile(rf"\d+(?:[,.-]\d+)*|\b(?:{_DIGIT_WORDS})\b", re.IGNORECASE)

_ES_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    iban = re.sub(r"[\s-]", "", candidate).upper()
    if not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _spanish_id_valid(prefix: str | None, digits: str, letter: str) -> bool:
    if len(digits) == 7 and not prefix:
        return False
    number = int(str("XYZ".index(prefix)) + digits if prefix else digits)
    return _ES_LETTERS[number % 23] == letter


def _digit_kind(run: str) -> str | None:
    if _DATE.fullmatch(run) or _AMOUNT.fullmatch(run):
        return None
    digits = re.sub(r"\D", "", run)
    n = len(digits)
    if 13 <= n <= 19 and luhn_valid(digits):
        return CARD_NUMBER
    if n > 15:
        return ACCOUNT_NUMBER
    if n >= 7:
        return PHONE_NUMBER
    return None


def find(text: str) -> list[tuple[int, int, str]]:
    """Spans ``(start, end, kind)`` of personal data in ``text``, not overlapping, in order."""
    spans: list[tuple[int, int, str]] = []

    def free(start: int, end: int) -> bool:
        return all(end <= s or start >= e for s, e, _ in spans)

    spans += [(m.start(), m.end(), m.group(1)) for m in _PLACEHOLDER.finditer(text)]
    for pattern, kind in ((_EMAIL, EMAIL_ADDRESS), (_SPOKEN_EMAIL, EMAIL_ADDRESS)):
        spans += [(m.start(), m.end(), kind) for m in pattern.finditer(text) if free(m.start(), m.end())]
    for m in _IBAN.finditer(text):
        # The pattern may run on into following capitals ("… 32 AND"): try the longest valid prefix.
        ends = [m.start() + i + 1 for i, ch in enumerate(m.group()) if ch.isalnum()]
        for end in reversed(ends[14:]):
            if free(m.start(), end) and iban_valid(text[m.start():end]):
                spans.append((m.start(), end, IBAN))
                break
    for pattern in (_SSN, _UK_NINO):
        spans += [(m.start(), m.end(), NATIONAL_ID) for m in pattern.finditer(text) if free(m.start(), m.end())]
    for m in _ES_ID.finditer(text):
        if free(m.start(), m.end()) and _spanish_id_valid(*m.groups()):
            spans.append((m.start(), m.end(), NATIONAL_ID))
    for m in _SECURITY_CODE.finditer(text):
        if free(m.start(1), m.end(1)):
            spans.append((m.start(1), m.end(1), SECURITY_CODE))
    for pattern, kind, fewest in _NAMED_NUMBERS:
        for m in pattern.finditer(text):
            if len(_DIGIT_TOKEN.findall(m.group(1))) >= fewest and free(m.start(1), m.end(1)):
                spans.append((m.start(1), m.end(1), kind))
    for m in _DIGIT_RUN.finditer(text):
        run = m.group().rstrip(" .,-")
        kind = _digit_kind(run)
        if kind and free(m.start(), m.start() + len(run)):
            spans.append((m.start(), m.start() + len(run), kind))
    for m in _GROUPED_RUN.finditer(text):
        spans += [(start, end, CARD_NUMBER) for start, end in _grouped_cards(m) if free(start, end)]
    return sorted(spans)


def _grouped_cards(run: re.Match[str]) -> list[tuple[int, int]]:
    """Where a run of digit groups holds a card number: the longest stretch of whole groups whose 13 to 19 digits
    pass the Luhn check, or four groups of four figures (a card as it is read out, a digit misheard) that are not
    all years; taken from the left. Only cards: a short list of numbers ("rooms 12, 14, 16, 18") is no phone
    number, and a list of years ("in 2019, 2020, 2021, 2022") is no card."""
    text = run.group()
    groups = [(g.start(), g.end(), "".join(_DIGIT_VALUES.get(token.lower(), token)
                                           for token in re.findall(r"\d|[^\W\d]+", g.group())))
              for g in _GROUP.finditer(text)]
    found: list[tuple[int, int]] = []
    i = 0
    while i < len(groups):
        best = None
        digits = groups[i][2]
        for j in range(i + 1, len(groups)):  # no card has more than 19 digits: so far and no further
            digits += groups[j][2]
            if len(digits) > 19:
                break
            if len(digits) >= 13 and luhn_valid(digits) or j - i == 3 and _read_in_fours(
                    [text[s:e] for s, e, _ in groups[i:j + 1]]):
                best = j
        if best is None:
            i += 1
            continue
        found.append((run.start() + groups[i][0], run.start() + groups[best][1]))
        i = best + 1
    return found


def _read_in_fours(groups: list[str]) -> bool:
    return all(re.fullmatch(r"\d{4}", g) for g in groups) and not all(1900 <= int(g) <= 2099 for g in groups)


def redact(text: str) -> tuple[str, list[Finding]]:
    """``text`` with each finding replaced by ``[KIND]``, and where those placeholders stand. A call's segments
    are masked together, by :class:`SegmentRedactor`."""
    return _placed(text, find(text))


def _placed(text: str, spans: list[tuple[int, int, str]]) -> tuple[str, list[Finding]]:
    """``text`` with each of ``spans`` (in order, not overlapping) replaced by its placeholder."""
    out: list[str] = []
    findings: list[Finding] = []
    position = 0
    length = 0
    for start, end, kind in spans:
        out.append(text[position:start])
        length += start - position
        placeholder = f"[{kind}]"
        findings.append(Finding(kind, length, length + len(placeholder)))
        out.append(placeholder)
        length += len(placeholder)
        position = end
    out.append(text[position:])
    return "".join(out), findings


CONTEXT_SEGMENTS = 3  # how many segments before the newest are read with it
RUN_SEGMENTS = 12  # how far back, in segments, a number read out between short replies is followed
BRIEF_WORDS = 5  # a reply this short ("Okay.", "Mm-hmm.", "Okay, and the next four?") does not end a number's reading
_CUT = " .,-"  # what Whisper writes where a number's reader paused
# What may be a part of a number read out: a figure, digit words in a row ("one one"), or a digit word alone.
_FIGURES = re.compile(rf"\d|{_GROUPED_RUN.pattern}|^\W*{_DIGIT}\W*$", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def _has_figures(text: str) -> bool:
    return _FIGURES.search(text) is not None


def _brief(text: str) -> bool:
    """Whether a segment says little beside its figures: a reply, or a group read out with a word or two."""
    return sum(word.lower() not in _DIGIT_VALUES for word in _WORD.findall(text)) <= BRIEF_WORDS


class SegmentRedactor:
    """Masks a call's segments as they come, each read together with the :data:`CONTEXT_SEGMENTS` before it, with
    the :data:`CONTEXT_SEGMENTS` of the same voice before it, and with the figures its voice read out just before
    it between short replies.

    Whisper cuts segments where the voice pauses, and a caller reading out a card pauses between its groups:
    "4111." | "1111." | "1111." | "1111." holds no card in any one segment, nor in any two. Read with the segments
    before it, the last group completes the card, and the card is masked in every segment that holds a part of
    it: :meth:`add` says which segments' masked text changed, the earlier ones included. On a call with its
    speakers apart, the agent's "okay" between the groups is left out of the caller's own reading. And the segments
    with figures that a voice said just before the newest are read together without the short replies between
    them, up to :data:`RUN_SEGMENTS` back: on a mono call the agent's "okay" and "go on" come in the same voice,
    and a caller may read a card out over more segments than a window holds. A name that ends one segment is
    read with the digits that open the next ("… and the security code" | "is 742."), whoever says them."""

    def __init__(self) -> None:
        self._said: list[str] = []  # each segment as it was said
        self._voices: list[Hashable] = []  # who said it (a speaker, a channel), None when unknown
        # each segment's masked stretches in its own text: (start, end, kind, length of the whole finding)
        self._spans: list[list[tuple[int, int, str, int]]] = []

    def add(self, text: str, voice: Hashable = None) -> list[int]:
        """Take the next segment's text and who said it; return the positions of the segments whose masked text
        changed (the new one among them when it holds personal data), in order."""
        self._said.append(text)
        self._voices.append(voice)
        self._spans.append([])
        last = len(self._said) - 1
        window = list(range(max(0, last - CONTEXT_SEGMENTS), last + 1))
        changed = self._read(window)
        own = list(islice((k for k in range(last, -1, -1) if self._voices[k] == voice), CONTEXT_SEGMENTS + 1))[::-1]
        if voice is not None and own != window:
            changed |= self._read(own)
        if _has_figures(text):
            run = self._figures_before(last, voice)[::-1] + [last]
            if len(run) > 1 and run != window and run != own:  # the same segments read again find nothing new
                changed |= self._read(run)
        return sorted(changed)

    def masked(self, k: int) -> tuple[str, list[Finding]]:
        """Segment ``k``'s text with its personal data masked, and where the placeholders stand."""
        return _placed(self._said[k], [(start, end, kind) for start, end, kind, _ in self._spans[k]])

    def carried_into(self, text: str) -> tuple[str, list[Finding]]:
        """``text``, the call's whole text made of these segments one after the other (a record's transcript),
        masked as :func:`redact` masks it and, besides, where each segment stands in it, as that segment is masked:
        a card read out between the agent's replies is no card in the whole text read alone."""
        spans: list[tuple[int, int, str]] = []
        cursor = 0
        for said, marked in zip(self._said, self._spans):
            core = said.strip()
            at = text.find(core, cursor) if core else -1
            if at < 0:  # not in the text as it was said: the text's own reading still masks what it holds
                continue
            lead = len(said) - len(said.lstrip())
            spans += [(at + s - lead, at + e - lead, kind) for s, e, kind, _ in marked]
            cursor = at + len(core)
        return redact(_placed(text, spans)[0])  # the placeholders are found again, as the kinds they name

    def first_open(self) -> int:
        """The position of the first segment whose masked text the next segment may still change (the number of
        segments when none): the first with figures left unmasked among those the next one will be read with.
        Until the next segments come, a number that they complete may have a part in it."""
        count = len(self._said)
        reach = list(range(max(0, count - CONTEXT_SEGMENTS), count))
        for voice in set(self._voices[max(0, count - RUN_SEGMENTS):]):
            reach += islice((k for k in range(count - 1, -1, -1) if self._voices[k] == voice), CONTEXT_SEGMENTS)
            reach += self._figures_before(count, voice)
        return min((k for k in reach if _has_figures(self.masked(k)[0])), default=count)  # figures not masked yet

    def _figures_before(self, position: int, voice: Hashable) -> list[int]:
        """The segments with figures that ``voice`` said just before ``position``, latest first: back through its
        short replies (and past other voices' segments), up to the first thing it said at length, that one
        included when it has figures, and at most :data:`RUN_SEGMENTS` back."""
        found: list[int] = []
        for k in range(position - 1, max(-1, position - RUN_SEGMENTS), -1):
            if self._voices[k] != voice:
                continue
            said = self._said[k]
            if _has_figures(said):
                found.append(k)
            if not _brief(said):
                break
        return found

    def _read(self, segments: list[int]) -> set[int]:
        """Find personal data in ``segments`` read one after the other; mark it in each; say which changed. A
        stretch marked before is marked again as what a longer finding over it is: three groups of a card read as
        a phone number until the fourth comes are a card's."""
        offsets = []
        position = 0
        for k in segments:
            offsets.append(position)
            position += len(self._said[k]) + 1
        changed: set[int] = set()
        for start, end, kind in find(" ".join(self._said[k] for k in segments)):
            extent = end - start
            for k, offset in zip(segments, offsets):
                said = self._said[k]
                s, e = max(start, offset) - offset, min(end - offset, len(said))
                while s < e and said[s] in _CUT:  # the part of a number in this segment, without the pause marks
                    s += 1
                while e > s and said[e - 1] in _CUT:
                    e -= 1
                if s >= e:
                    continue
                holder = next((span for span in self._spans[k] if span[0] <= s and e <= span[1]), None)
                if holder is None or holder[3] < extent and holder[2] != kind:
                    self._spans[k] = _merged(self._spans[k] + [(s, e, kind, extent)])
                    changed.add(k)
        return changed


def _merged(spans: list[tuple[int, int, str, int]]) -> list[tuple[int, int, str, int]]:
    """Stretches that overlap made one, of the kind of the longest finding among them."""
    out: list[tuple[int, int, str, int]] = []
    for start, end, kind, extent in sorted(spans):
        if out and start < out[-1][1]:
            s, e, k, x = out[-1]
            if extent > x:
                k, x = kind, extent
            out[-1] = (s, max(e, end), k, x)
        else:
            out.append((start, end, kind, extent))
    return out
