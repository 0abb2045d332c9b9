/*
 * jetstream.c - JetStream API requests: streams, their last message, the checkpoint.
 *
 * nats.c 3.4.1 cannot list streams by subject, and its stream info does not carry the last
 * message's headers, so these go through the JSON API ($JS.API.*) directly.
 */
#include "outboxd/jetstream.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/evp.h>

#include "outboxd/anchor.h"
#include "outboxd/outbox.h"
#include "outboxd/subject.h"
#include "outboxd/util.h"

static NatsSecurity security;
static int64_t ping_interval_ms = 10000;

void jsapi_set_security(const NatsSecurity *sec)
{
    security = *sec;
}

void jsapi_set_ping_interval(int64_t ms)
{
    if (ms > 0)
        ping_interval_ms = ms;
}

int64_t jsapi_ping_interval(void)
{
    return ping_interval_ms;
}

/* CRC-16/XMODEM, which NKeys append to their bytes. */
static uint16_t crc16(const unsigned char *p, size_t n)
{
    uint16_t crc = 0;
    for (size_t i = 0; i < n; i++) {
        crc ^= (uint16_t)(p[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = crc & 0x8000 ? (uint16_t)(crc << 1 ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

static const char base32_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

int jsapi_nkey_public(const char *path, char *out, size_t outlen, char *err, size_t errlen)
{
    /* A seed is base32 of: 2 prefix bytes, 32 bytes of Ed25519 seed, CRC-16 (little endian). */
    char text[256] = "";
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "could not read the NKey seed file %s", path);
        return -1;
    }
    /* The file may hold other lines (a creds file does): take the first that looks like a
     * user seed. */
    char line[256];
    while (fgets(line, sizeof(line), f)) {
        char *t = line + strspn(line, " \t");
        if (strncmp(t, "SU", 2) == 0) {
            snprintf(text, sizeof(text), "%.*s", (int)strcspn(t, " \t\r\n"), t);
            break;
        }
    }
    fclose(f);
    unsigned char raw[40];
    size_t n = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (const char *c = text; *c && n < sizeof(raw); c++) {
        const char *pos = strchr(base32_alphabet, *c);
        if (!pos) {
            n = 0;
            break;
        }
        acc = acc << 5 | (uint32_t)(pos - base32_alphabet);
        bits += 5;
        if (bits >= 8) {
            bits -= 8;
            raw[n++] = (unsigned char)(acc >> bits & 0xff);
        }
    }
    if (n != 36 || crc16(raw, 34) != (uint16_t)(raw[34] | raw[35] << 8) ||
        (raw[0] & 0xf8) != 18 << 3) {
        snprintf(err, errlen, "%s holds no valid NKey user seed (a line starting with SU)", path);
        OPENSSL_cleanse(raw, sizeof(raw));
        return -1;
    }
    unsigned char prefix = (unsigned char)((raw[0] & 7) << 5 | (raw[1] & 0xf8) >> 3);
    EVP_PKEY *key = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, raw + 2, 32);
    OPENSSL_cleanse(raw, sizeof(raw));
    unsigned char pub[35];
    size_t publen = 32;
    if (!key || EVP_PKEY_get_raw_public_key(key, pub + 1, &publen) != 1 || publen != 32) {
        EVP_PKEY_free(key);
        snprintf(err, errlen, "could not derive the NKey public key from %s", path);
        return -1;
    }
    EVP_PKEY_free(key);
    pub[0] = prefix;
    uint16_t crc = crc16(pub, 33);
    unsigned char full[35];
    memcpy(full, pub, 33);
    full[33] = (unsigned char)(crc & 0xff);
    full[34] = (unsigned char)(crc >> 8);
    Buf b;
    buf_init(&b);
    acc = 0;
    bits = 0;
    for (size_t i = 0; i < sizeof(full); i++) {
        acc = acc << 8 | full[i];
        bits += 8;
        while (bits >= 5) {
            bits -= 5;
            buf_putc(&b, base32_alphabet[acc >> bits & 31]);
        }
    }
    if (bits > 0)
        buf_putc(&b, base32_alphabet[acc << (5 - bits) & 31]);
    snprintf(out, outlen, "%s", b.data);
    buf_deinit(&b);
    return 0;
}

int jsapi_apply_security(natsOptions *o, char *err, size_t errlen)
{
    const NatsSecurity *sec = &security;
    natsStatus s = NATS_OK;
    const char *what = "";
    if (sec->user || sec->password) {
        what = "user and password";
        s = natsOptions_SetUserInfo(o, sec->user ? sec->user : "", sec->password);
    }
    if (s == NATS_OK && sec->token) {
        what = "token";
        s = natsOptions_SetToken(o, sec->token);
    }
    if (s == NATS_OK && sec->nkey_seed_file) {
        char pub[64];
        if (jsapi_nkey_public(sec->nkey_seed_file, pub, sizeof(pub), err, errlen) < 0)
            return -1;
        what = "NKey seed file";
        s = natsOptions_SetNKeyFromSeed(o, pub, sec->nkey_seed_file);
    }
    if (s == NATS_OK && sec->creds_file) {
        what = "credentials file";
        s = natsOptions_SetUserCredentialsFromFiles(o, sec->creds_file, NULL);
    }
    if (s == NATS_OK && (sec->tls_ca || sec->tls_cert || sec->tls_key || sec->tls_server_name)) {
        what = "TLS";
        s = natsOptions_SetSecure(o, true);
        if (s == NATS_OK && sec->tls_ca) {
            what = "TLS CA file";
            s = natsOptions_LoadCATrustedCertificates(o, sec->tls_ca);
        }
        if (s == NATS_OK && (sec->tls_cert || sec->tls_key)) {
            what = "TLS client certificate and key";
            s = sec->tls_cert && sec->tls_key
                    ? natsOptions_LoadCertificatesChain(o, sec->tls_cert, sec->tls_key)
                    : NATS_INVALID_ARG;
        }
        if (s == NATS_OK && sec->tls_server_name) {
            what = "TLS server name";
            s = natsOptions_SetExpectedHostname(o, sec->tls_server_name);
        }
    }
    if (s != NATS_OK) {
        const char *last = nats_GetLastError(NULL);
        snprintf(err, errlen, "could not use the NATS %s: %s%s%s", what, natsStatus_GetText(s),
                 last && *last ? ": " : "", last && *last ? last : "");
        return -1;
    }
    return 0;
}

natsStatus jsapi_set_servers(natsOptions *o, const char *urls)
{
    char *copy = xstrdup(urls);
    const char **servers = NULL;
    int n = 0;
    for (char *save = NULL, *tok = strtok_r(copy, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ')
            tok++;
        if (!*tok)
            continue;
        servers = xrealloc(servers, sizeof(char *) * (size_t)(n + 1));
        servers[n++] = tok;
    }
    natsStatus s = natsOptions_SetServers(o, servers, n);
    free(servers);
    free(copy);
    return s;
}

void jsapi_redact_urls(const char *urls, char *out, size_t outlen)
{
    Buf b;
    buf_init(&b);
    const char *p = urls;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        const char *at = memchr(p, '@', n);
        const char *scheme = strstr(p, "://");
        if (at && scheme && scheme < at) {
            buf_append(&b, p, (size_t)(scheme + 3 - p));
            buf_puts(&b, "***@");
            buf_append(&b, at + 1, n - (size_t)(at + 1 - p));
        } else {
            buf_append(&b, p, n);
        }
        if (!end)
            break;
        buf_putc(&b, ',');
        p = end + 1;
    }
    snprintf(out, outlen, "%s", b.data ? b.data : "");
    buf_deinit(&b);
}

natsConnection *jsapi_connect_once(const char *urls, char *err, size_t errlen)
{
    natsOptions *o = NULL;
    natsConnection *nc = NULL;
    natsStatus s = natsOptions_Create(&o);
    if (s == NATS_OK && jsapi_apply_security(o, err, errlen) < 0) {
        natsOptions_Destroy(o);
        return NULL;
    }
    if (s == NATS_OK)
        s = jsapi_set_servers(o, urls);
    if (s == NATS_OK)
        s = natsOptions_SetTimeout(o, 3000);
    if (s == NATS_OK)
        s = natsOptions_SetMaxReconnect(o, 0);
    if (s == NATS_OK) /* a silent connection is closed, and the request on it fails */
        s = natsOptions_SetPingInterval(o, ping_interval_ms);
    if (s == NATS_OK)
        s = natsOptions_SetMaxPingsOut(o, NATS_MAX_PINGS_OUT);
    if (s == NATS_OK)
        s = natsConnection_Connect(&nc, o);
    natsOptions_Destroy(o);
    if (s != NATS_OK) {
        char shown[512];
        jsapi_redact_urls(urls, shown, sizeof(shown));
        snprintf(err, errlen, "could not connect to NATS at %s: %s", shown, natsStatus_GetText(s));
        natsConnection_Destroy(nc);
        return NULL;
    }
    return nc;
}

json_t *jsapi_request(natsConnection *nc, const char *subject, const char *body, bool *no_responders,
                      char *err, size_t errlen)
{
    return jsapi_request_within(nc, subject, body, 5000, no_responders, err, errlen);
}

json_t *jsapi_request_within(natsConnection *nc, const char *subject, const char *body,
                             int64_t timeout_ms, bool *no_responders, char *err, size_t errlen)
{
    natsMsg *reply = NULL;
    *no_responders = false;
    natsStatus s = natsConnection_RequestString(&reply, nc, subject, body, timeout_ms);
    if (s == NATS_NO_RESPONDERS) {
        *no_responders = true;
        snprintf(err, errlen, "no responders for %s", subject);
        return NULL;
    }
    if (s != NATS_OK) {
        snprintf(err, errlen, "JetStream request %s failed: %s", subject, natsStatus_GetText(s));
        return NULL;
    }
    json_error_t jerr;
    json_t *root =
        json_loadb(natsMsg_GetData(reply), (size_t)natsMsg_GetDataLength(reply), 0, &jerr);
    natsMsg_Destroy(reply);
    if (!root)
        snprintf(err, errlen, "JetStream sent an unreadable reply to %s: %s", subject, jerr.text);
    return root;
}

/* The first stream capturing one filter. */
static int find_one_stream(natsConnection *nc, const char *filter, char *name, size_t namelen,
                           bool *found, char *err, size_t errlen)
{
    json_t *req = json_pack("{s:s}", "subject", filter);
    char *body = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    bool no_responders;
    json_t *reply = jsapi_request(nc, "$JS.API.STREAM.NAMES", body, &no_responders, err, errlen);
    free(body);
    if (!reply)
        return -1;
    json_t *names = json_object_get(reply, "streams");
    *found = json_is_array(names) && json_array_size(names) > 0;
    if (*found)
        snprintf(name, namelen, "%s", json_string_value(json_array_get(names, 0)) ?: "");
    json_decref(reply);
    return 0;
}

int jsapi_find_stream(natsConnection *nc, const char *filters, char *name, size_t namelen,
                      bool *found, char *err, size_t errlen)
{
    char first[256] = "", other[256], filter[1024], first_filter[1024] = "";
    *found = true;
    for (const char *p = filters; *p && *found;) {
        size_t n = strcspn(p, " ");
        snprintf(filter, sizeof filter, "%.*s", (int)n, p);
        p += n + (p[n] == ' ');
        if (find_one_stream(nc, filter, other, sizeof other, found, err, errlen) < 0)
            return -1;
        if (*found && first[0] && strcmp(first, other) != 0) {
            snprintf(err, errlen,
                     "subjects %s go to stream \"%s\" but %s to stream \"%s\": outboxd keeps "
                     "commit order within one stream, so one stream must capture every subject "
                     "template (add the subjects to one stream)",
                     first_filter, first, filter, other);
            return -1;
        }
        if (*found && !first[0]) {
            snprintf(first, sizeof first, "%s", other);
            snprintf(first_filter, sizeof first_filter, "%s", filter);
        }
    }
    if (*found)
        snprintf(name, namelen, "%s", first);
    return 0;
}

/* Decodes standard base64 (no line breaks) into out. */
static void base64_decode(const char *in, Buf *out)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    uint32_t acc = 0;
    int bits = 0;
    for (const char *c = in; *c && *c != '='; c++) {
        const char *pos = strchr(alphabet, *c);
        if (!pos)
            continue;
        acc = acc << 6 | (uint32_t)(pos - alphabet);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            buf_putc(out, (char)(acc >> bits & 0xff));
        }
    }
}

bool jsapi_header_value(const char *block, const char *name, char *out, size_t outlen)
{
    size_t n = strlen(name);
    for (const char *p = block ? strstr(block, "\r\n") : NULL; p; p = strstr(p + 2, "\r\n")) {
        if (strncmp(p + 2, name, n) != 0 || p[2 + n] != ':')
            continue;
        const char *v = p + 2 + n + 1;
        while (*v == ' ' || *v == '\t')
            v++;
        size_t len = strcspn(v, "\r\n");
        while (len > 0 && (v[len - 1] == ' ' || v[len - 1] == '\t'))
            len--;
        snprintf(out, outlen, "%.*s", (int)len, v);
        return true;
    }
    if (outlen)
        out[0] = '\0';
    return false;
}

int jsapi_msg_get(natsConnection *nc, const char *stream, uint64_t seq, const char *next_by_subj,
                  int64_t timeout_ms, JsStoredMsg *out, char *err, size_t errlen)
{
    char subject[320];
    snprintf(subject, sizeof(subject), "$JS.API.STREAM.MSG.GET.%s", stream);
    json_t *req = next_by_subj ? json_pack("{s:I,s:s}", "seq", (json_int_t)seq, "next_by_subj",
                                           next_by_subj)
                               : json_pack("{s:I}", "seq", (json_int_t)seq);
    char *body = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    bool no_responders;
    json_t *reply = jsapi_request_within(nc, subject, body, timeout_ms, &no_responders, err, errlen);
    free(body);
    if (!reply)
        return -1;
    int rc = 0;
    json_t *error = json_object_get(reply, "error");
    json_t *msg = json_object_get(reply, "message");
    if (error) {
        /* 10037: no message at or after seq (on that subject). */
        if (json_integer_value(json_object_get(error, "err_code")) == 10037) {
            rc = 1;
        } else {
            snprintf(err, errlen, "could not read message %" PRIu64 " of stream %s: %s", seq,
                     stream, json_string_value(json_object_get(error, "description")) ?: "error");
            rc = -1;
        }
    } else if (!json_is_object(msg)) {
        snprintf(err, errlen, "could not read message %" PRIu64 " of stream %s: unexpected reply",
                 seq, stream);
        rc = -1;
    } else {
        /* "hdrs" is the base64 of the raw header block: "NATS/1.0\r\nKey: value\r\n...". Read
         * here because libnats 3.4.1 misreads empty header values. */
        out->seq = (uint64_t)json_integer_value(json_object_get(msg, "seq"));
        const char *t = json_string_value(json_object_get(msg, "time"));
        if (!t || !time_parse_rfc3339(t, strlen(t), &out->time_unix_us))
            out->time_unix_us = 0;
        buf_reset(&out->hdrs);
        const char *b64 = json_string_value(json_object_get(msg, "hdrs"));
        if (b64)
            base64_decode(b64, &out->hdrs);
        buf_putc(&out->hdrs, '\0');
        out->hdrs.len--;
    }
    json_decref(reply);
    return rc;
}

int jsapi_own_events_back(natsConnection *nc, const char *stream, uint64_t last_seq,
                          const char *source, unsigned max_foreign, JsOwnVisit *visit, void *arg,
                          char *err, size_t errlen)
{
    JsStoredMsg m = {0};
    buf_init(&m.hdrs);
    int rc = 0;
    unsigned foreign = 0;
    for (uint64_t seq = last_seq; seq > 0 && foreign <= max_foreign; seq--) {
        int got = jsapi_msg_get(nc, stream, seq, NULL, 5000, &m, err, errlen);
        if (got < 0) {
            rc = -1;
            break;
        }
        char pos[OUTBOX_POSITION_MAX + 8], when[48], from[ANCHOR_SOURCE_MAX], replay[8];
        JsOwnEvent ev = {.seq = seq};
        /* A deleted message (got 1), a replayed copy, another writer's message or another
         * relay's event says nothing of this relay's: pass over it. */
        if (got == 0 &&
            anchor_from_event(
                jsapi_header_value(m.hdrs.data, OUTBOX_HDR_POSITION, pos, sizeof(pos)) ? pos : NULL,
                jsapi_header_value(m.hdrs.data, OUTBOX_HDR_COMMIT_TIME, when, sizeof(when)) ? when
                                                                                           : NULL,
                jsapi_header_value(m.hdrs.data, OUTBOX_HDR_SOURCE, from, sizeof(from)) ? from
                                                                                      : NULL,
                jsapi_header_value(m.hdrs.data, "Outbox-Replay", replay, sizeof(replay)) ? replay
                                                                                        : NULL,
                source, &ev.anchor)) {
            foreign = 0;
            jsapi_header_value(m.hdrs.data, OUTBOX_HDR_MSG_ID, ev.id, sizeof(ev.id));
            jsapi_header_value(m.hdrs.data, OUTBOX_HDR_COMMIT_LSN, pos, sizeof(pos));
            if (!lsn_parse(pos, &ev.commit_lsn))
                ev.commit_lsn = ev.anchor.pos.lsn;
            if (!visit(arg, &ev))
                break;
        } else {
            foreign++;
        }
    }
    buf_deinit(&m.hdrs);
    return rc;
}

bool jsapi_stream_at_limits(const StreamInfo *info, uint64_t add_bytes)
{
    if (info->max_msgs > 0 && info->messages >= (uint64_t)info->max_msgs)
        return true;
    return info->max_bytes > 0 && info->bytes + add_bytes > (uint64_t)info->max_bytes;
}

static bool first_event(void *arg, const JsOwnEvent *ev)
{
    *(JsOwnEvent *)arg = *ev;
    return false;
}

int jsapi_last_own_event(natsConnection *nc, const char *stream, uint64_t last_seq,
                         const char *source, unsigned max_foreign, JsOwnEvent *last, char *err,
                         size_t errlen)
{
    last->seq = 0;
    if (jsapi_own_events_back(nc, stream, last_seq, source, max_foreign, first_event, last, err,
                              errlen) < 0)
        return -1;
    return last->seq != 0;
}

bool jsapi_stream_covers(const StreamInfo *info, const char *filter)
{
    char one[256];
    for (const char *p = info->subjects; *p;) {
        size_t n = strcspn(p, " ");
        snprintf(one, sizeof(one), "%.*s", (int)n, p);
        p += n + (p[n] == ' ');
        if (subject_covers(one, filter))
            return true;
    }
    return false;
}

int jsapi_stream_info(natsConnection *nc, const char *stream, StreamInfo *info, char *err,
                      size_t errlen)
{
    char name[256], subject[320];
    snprintf(name, sizeof(name), "%s", stream); /* stream may be info->name */
    snprintf(subject, sizeof(subject), "$JS.API.STREAM.INFO.%s", name);
    bool no_responders;
    json_t *reply = jsapi_request(nc, subject, "", &no_responders, err, errlen);
    if (!reply)
        return -1;
    json_t *config = json_object_get(reply, "config");
    json_t *state = json_object_get(reply, "state");
    if (!config || !state) {
        snprintf(err, errlen, "could not read stream %s: unexpected reply", name);
        json_decref(reply);
        return -1;
    }
    memset(info, 0, sizeof(*info));
    snprintf(info->name, sizeof(info->name), "%s", name);
    info->replicas = (int)json_integer_value(json_object_get(config, "num_replicas"));
    if (info->replicas < 1)
        info->replicas = 1;
    info->duplicate_window_ms =
        json_integer_value(json_object_get(config, "duplicate_window")) / 1000000;
    size_t i;
    json_t *s;
    json_array_foreach(json_object_get(config, "subjects"), i, s)
    {
        size_t used = strlen(info->subjects);
        if (json_is_string(s))
            snprintf(info->subjects + used, sizeof(info->subjects) - used, "%s%s",
                     used ? " " : "", json_string_value(s));
    }
    info->last_seq = (uint64_t)json_integer_value(json_object_get(state, "last_seq"));
    info->messages = (uint64_t)json_integer_value(json_object_get(state, "messages"));
    info->bytes = (uint64_t)json_integer_value(json_object_get(state, "bytes"));
    info->max_msgs = json_integer_value(json_object_get(config, "max_msgs"));
    info->max_bytes = json_integer_value(json_object_get(config, "max_bytes"));
    json_decref(reply);
    return 0;
}

int jsapi_checkpoint_read(jsCtx *js, const char *bucket, const char *key, Checkpoint *cp,
                          char *err, size_t errlen)
{
    memset(cp, 0, sizeof(*cp));
    kvStore *kv = NULL;
    natsStatus s = js_KeyValue(&kv, js, bucket);
    if (s == NATS_NOT_FOUND)
        return 0;
    kvEntry *e = NULL;
    if (s == NATS_OK)
        s = kvStore_Get(&e, kv, key);
    int rc = 0;
    if (s == NATS_NOT_FOUND) {
        rc = 0;
    } else if (s != NATS_OK) {
        snprintf(err, errlen, "could not read the checkpoint from bucket \"%s\": %s", bucket,
                 natsStatus_GetText(s));
        rc = -1;
    } else {
        char why[384];
        const void *v = kvEntry_Value(e);
        if (checkpoint_decode(v ? v : "", v ? (size_t)kvEntry_ValueLen(e) : 0, cp, why,
                              sizeof(why)) < 0) {
            snprintf(err, errlen,
                     "could not read checkpoint \"%s\" in bucket \"%s\": %s (remove the key "
                     "to start from the slot's position)",
                     key, bucket, why);
            rc = -1;
        }
    }
    kvEntry_Destroy(e);
    kvStore_Destroy(kv);
    return rc;
}
