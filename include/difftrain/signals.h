// Stop requests from the outside: SIGTERM (schedulers, `kill`), SIGINT (Ctrl-C) and SIGUSR1
// (Slurm's usual warning signal, `sbatch --signal=USR1@120`) ask the trainer to save a checkpoint
// at the next step boundary and exit with kExitStopped. A second SIGINT exits at once (130).
#pragma once

namespace difftrain {

void install_stop_handlers();
// The signal that asked to stop, or 0.
int stop_signal();
// Sets the flag as a signal would (for tests and for a peer rank's stop).
void request_stop(int signal);
const char* signal_name(int signal);

}  // namespace difftrain
