/*
 * notify.h - telling systemd (Type=notify) about outboxd's state, without libsystemd: one
 * datagram to $NOTIFY_SOCKET per state change. Does nothing when systemd did not ask.
 */
#ifndef OUTBOXD_NOTIFY_H
#define OUTBOXD_NOTIFY_H

/* Sends state ("READY=1\nSTATUS=streaming", "STOPPING=1", ...) to $NOTIFY_SOCKET, if set. */
void notify_systemd(const char *state);

#endif
