"""Building the student: from a config, by pruning the teacher, as a LoRA adapter, or pretrained (`build`)."""

from distill.students.build import StudentInfo, build_student, evenly_spaced, prune_layers

__all__ = ["StudentInfo", "build_student", "evenly_spaced", "prune_layers"]
