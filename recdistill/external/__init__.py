"""Teachers from outside the run: the contract they meet and the ways they come in.

The contract (:mod:`recdistill.external.contract`) is public: :class:`TeacherLists` is what a
teacher is asked, :class:`TeacherModel` what it must answer. The kinds a config names in
``[teachers.NAME]`` (:mod:`recdistill.external.spec`): ``torch`` (:mod:`.torch_module`),
``onnx`` (:mod:`.onnx_graph`), both of the tensor form (:mod:`.tensor`); ``embeddings``
(:mod:`.embeddings`); ``scores`` (:mod:`.logged`); and ``python``, any object meeting the
contract. :mod:`.adapter` makes a contract model a teacher a stage learns from, :mod:`.load`
builds each kind from its spec. docs/external-teachers.md walks through all of it.
"""

from recdistill.external.contract import TeacherLists, TeacherModel

__all__ = ["TeacherLists", "TeacherModel"]
