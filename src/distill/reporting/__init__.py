"""`distill report`: report.md / report.html with plots and a model card per student (`report`).

Named `reporting` (not `report`) so the package never hides the public function `distill.report`."""
