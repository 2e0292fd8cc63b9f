"""Teachers as prefill services (MOPD 3.3): the client interface, its backends (in-process
transformers, HTTP, vLLM), the embedded server and the domain routing."""

from mopd.teachers.base import SequenceScores, TeacherClient, TeacherError, lay_out
from mopd.teachers.http import HTTPTeacher
from mopd.teachers.inprocess import InProcessTeacher, prefill

__all__ = ["HTTPTeacher", "InProcessTeacher", "SequenceScores", "TeacherClient", "TeacherError",
           "lay_out", "prefill"]
