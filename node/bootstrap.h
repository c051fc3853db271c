/* bootstrap.h - `shardpacs bootstrap`: the files of a new cluster, one
 * folder per machine (bootstrap.c). */
#ifndef SP_BOOTSTRAP_H
#define SP_BOOTSTRAP_H

/* Runs `shardpacs bootstrap` with the arguments after the command word.
 * Returns the process exit status (0, 1 on failure, 2 on usage errors). */
int bootstrap_main(int argc, char **argv);

#endif
