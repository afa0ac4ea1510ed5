"""Mask personal data in a call record before it is stored for the CRM.

Every text field a person reads (the transcript, each segment, the translation, the
summary, the sub-topic and the follow-up actions) goes through :func:`services.common.pii.redact`; the record then lists each
placeholder's field, kind and position, never the value. A segment is read with the ones
before it (:class:`services.common.pii.SegmentRedactor`): their end may name what it opens with, and a number
read out in pieces is masked in each segment that holds one, and in the transcript where those segments stand
(read alone, the whole text may not show it as one number: the agent's replies come between its groups). Word
timings of a segment that held personal data are dropped with it (they would spell it out).
"""

from __future__ import annotations

from callcenter.v1 import common_pb2, crm_pb2
from services.common import pii

KIND_VALUES = {kind: common_pb2.PiiKind.Value(f"PII_KIND_{kind}") for kind in pii.KINDS}


def redact_record(record: crm_pb2.CallRecord) -> crm_pb2.CallRecord:
    """A copy of ``record`` with personal data masked and the redactions listed."""
    out = crm_pb2.CallRecord()
    out.CopyFrom(record)
    del out.redactions[:]

    def listed(field: str, masked: tuple[str, list[pii.Finding]]) -> str:
        """The masked text of ``field``, its placeholders listed in the record's redactions."""
        text, findings = masked
        out.redactions.extend(common_pb2.Redaction(kind=KIND_VALUES[f.kind], field=field, start=f.start, end=f.end)
                              for f in findings)
        return text

    redactors: dict[str, pii.SegmentRedactor] = {}
    for segments, name in ((out.segments, "segments"), (out.translated_segments, "translated_segments")):
        redactors[name] = redactor = pii.SegmentRedactor()  # each segment read with the ones before it
        for segment in segments:
            redactor.add(segment.text, (segment.speaker, segment.channel))
    # The whole text masked where its segments are too (a card read out between replies is none in it alone).
    out.transcript = listed("transcript", redactors["segments"].carried_into(out.transcript))
    out.translated_transcript = listed("translated_transcript",
                                       redactors["translated_segments"].carried_into(out.translated_transcript))
    for i, bullet in enumerate(list(out.summary)):
        out.summary[i] = listed(f"summary[{i}]", pii.redact(bullet))
    out.sub_topic = listed("sub_topic", pii.redact(out.sub_topic))
    for i, action in enumerate(list(out.follow_up_actions)):
        out.follow_up_actions[i] = listed(f"follow_up_actions[{i}]", pii.redact(action))
    for segments, name in ((out.segments, "segments"), (out.translated_segments, "translated_segments")):
        for i, segment in enumerate(segments):
            masked = redactors[name].masked(i)
            segment.text = listed(f"{name}[{i}].text", masked)
            if masked[1]:
                del segment.words[:]
    out.pii_redaction_applied = True
    return out
