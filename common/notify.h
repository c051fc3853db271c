/* notify.h - the systemd readiness protocol (sd_notify(3)) without
 * libsystemd: when the service manager set NOTIFY_SOCKET, a datagram such
 * as "READY=1" is sent to that AF_UNIX socket (a path, or an abstract name
 * starting with '@'); otherwise nothing happens. With Type=notify units,
 * `systemctl start` returns only once the process says it serves.
 *
 * Thread-safe (one socket per call); called a few times in a life. */
#ifndef SP_NOTIFY_H
#define SP_NOTIFY_H

/* Sends state (e.g. "READY=1\nSTATUS=serving") to NOTIFY_SOCKET. Returns 0
 * when sent or when no manager listens (NOTIFY_SOCKET unset), -errno or
 * SP_EINVAL (a malformed NOTIFY_SOCKET) otherwise. */
int notify_send(const char *state);

#endif
