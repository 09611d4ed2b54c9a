"""Running the study: the stages (data -> adapters -> cells -> results), the one generate -> score -> save path of
cells, training in worker processes, processes under ``accelerate launch``, the locks that let runs share work, the
console, the notebooks' setup call and the papermill runner. Imports the design and scoring rooms."""
