"""The pieces the loop is made of, one job each: how a micro-batch trains (`steps`) and what it optimises
(`objectives`); what every step checks (`guard`: non-finite numbers, stop signals); checkpoints (`checkpoint`: writing
and loading; `resume`: which one, in what form); metrics and the progress bar (`metrics`); evaluation during and after
training (`evaluate`); the exported model (`export`); `train.compile` (`compiled`); what `train.precision` means on
this machine (`precision`)."""
