#!/usr/bin/env python3
"""Traffic endpoints for the dpu-agent namespace tests, run inside a namespace with the
kernel's own stack (which checks checksums). Every mode stops on its own (timeouts).

  udp-echo ADDR PORT SECONDS         echo datagrams back, prefixed with the sender "ip:port|"
  tcp-echo ADDR PORT SECONDS         echo one connection's bytes back, prefixed the same way
  udp-ask  DST PORT MSG SECONDS      send MSG, print the reply (or TIMEOUT)
  tcp-ask  DST PORT MSG SECONDS      connect, send MSG, print the reply (or TIMEOUT)
  udp-sink ADDR PORT SECONDS         count datagrams: print "packets bytes first_ts last_ts"
  udp-flood DST PORT SIZE SECONDS    send SIZE-byte datagrams as fast as possible
  flow-server ADDR PORT SECONDS      echo sequence-numbered messages of long-lived flows, UDP and
                                     TCP on the same port, many at once; every answer carries the
                                     sender's "ip:port" as the server saw it. At the end it prints
                                     one line per TCP connection: "tcp PEER msgs reset|eof|open"
  flow DST PORT tcp|udp SECONDS MS   one long-lived flow: a numbered message every MS
                                     milliseconds for SECONDS, each answered by flow-server.
                                     Prints one JSON line: sent, answered, lost, the outside
                                     endpoints the server saw, the largest gap between answers
                                     (ms), and the error that ended it (reset, timeout) if any
"""

import socket
import sys
import time


def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def udp_echo(addr, port, secs):
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    s.bind((addr, port))
    s.settimeout(0.2)
    end = time.time() + secs
    while time.time() < end:
        try:
            data, peer = s.recvfrom(65535)
        except socket.timeout:
            continue
        s.sendto(f"{peer[0]}:{peer[1]}|".encode() + data, peer)


def tcp_echo(addr, port, secs):
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(4)
    s.settimeout(secs)
    try:
        c, peer = s.accept()
    except socket.timeout:
        return
    c.settimeout(secs)
    data = c.recv(65535)
    c.sendall(f"{peer[0]}:{peer[1]}|".encode() + data)
    c.close()


def udp_ask(dst, port, msg, secs):
    s = socket.socket(family(dst), socket.SOCK_DGRAM)
    s.settimeout(0.5)
    end = time.time() + secs
    while time.time() < end:
        s.sendto(msg.encode(), (dst, port))
        try:
            data, _ = s.recvfrom(65535)
            print(data.decode())
            return
        except socket.timeout:
            continue
    print("TIMEOUT")


def tcp_ask(dst, port, msg, secs):
    end = time.time() + secs
    while time.time() < end:
        try:
            s = socket.create_connection((dst, port), timeout=1.0)
            s.settimeout(secs)
            s.sendall(msg.encode())
            print(s.recv(65535).decode())
            s.close()
            return
        except (ConnectionRefusedError, socket.timeout, OSError):
            time.sleep(0.2)
    print("TIMEOUT")


def udp_sink(addr, port, secs):
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((addr, port))
    s.settimeout(0.2)
    end = time.time() + secs
    packets = 0
    nbytes = 0
    first = last = 0.0
    while time.time() < end:
        try:
            data = s.recv(65535)
        except socket.timeout:
            continue
        now = time.time()
        if packets == 0:
            first = now
        last = now
        packets += 1
        nbytes += len(data)
    print(f"{packets} {nbytes} {first} {last}")


def udp_flood(dst, port, size, secs):
    s = socket.socket(family(dst), socket.SOCK_DGRAM)
    payload = b"x" * size
    end = time.time() + secs
    sent = 0
    while time.time() < end:
        for _ in range(64):
            try:
                s.sendto(payload, (dst, port))
                sent += 1
            except OSError:
                pass
    print(sent)


def flow_server(addr, port, secs):
    import select
    fam = family(addr)
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.bind((addr, port))
    t = socket.socket(fam, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind((addr, port))
    t.listen(16)
    conns = {}  # socket -> [peer, messages, buffer, end state]
    ended = []
    end = time.time() + secs
    while time.time() < end:
        r, _, _ = select.select([u, t] + list(conns), [], [], 0.2)
        for s in r:
            if s is u:
                data, peer = u.recvfrom(65535)
                u.sendto(f"{peer[0]}:{peer[1]}|".encode() + data, peer)
            elif s is t:
                c, peer = t.accept()
                conns[c] = [f"{peer[0]}:{peer[1]}", 0, b"", "open"]
            else:
                st = conns[s]
                try:
                    data = s.recv(65535)
                except ConnectionResetError:
                    st[3] = "reset"
                    ended.append(st)
                    del conns[s]
                    continue
                if not data:
                    st[3] = "eof"
                    ended.append(st)
                    del conns[s]
                    continue
                st[2] += data
                while b"\n" in st[2]:
                    line, st[2] = st[2].split(b"\n", 1)
                    st[1] += 1
                    s.sendall(st[0].encode() + b"|" + line + b"\n")
    for st in ended + list(conns.values()):
        print(f"tcp {st[0]} {st[1]} {st[3]}")


def flow(dst, port, proto, secs, interval_ms):
    import json
    interval = interval_ms / 1000.0
    out = {"proto": proto, "sent": 0, "answered": 0, "endpoints": [], "max_gap_ms": 0.0,
           "error": None}
    answered = set()
    last_answer = None
    start = time.time()
    end = start + secs
    buf = b""

    def seen(reply):
        nonlocal last_answer
        peer, _, seq = reply.partition("|")
        if peer not in out["endpoints"]:
            out["endpoints"].append(peer)
        try:
            answered.add(int(seq))
        except ValueError:
            return
        now = time.time()
        if last_answer is not None:
            out["max_gap_ms"] = max(out["max_gap_ms"], (now - last_answer) * 1000.0)
        last_answer = now

    try:
        if proto == "tcp":
            s = socket.create_connection((dst, port), timeout=5.0)
        else:
            s = socket.socket(family(dst), socket.SOCK_DGRAM)
            s.connect((dst, port))
        s.settimeout(interval)
        seq = 0
        next_send = time.time()
        while True:
            now = time.time()
            if now >= end and (proto == "udp" or len(answered) >= seq or now > end + 10):
                break
            if now >= next_send and now < end:
                msg = f"{seq}\n".encode()
                if proto == "tcp":
                    s.sendall(msg)
                else:
                    s.send(msg)
                seq += 1
                out["sent"] = seq
                next_send += interval
            try:
                data = s.recv(65535)
            except socket.timeout:
                continue
            except ConnectionRefusedError:
                continue  # UDP: an ICMP error while the path changes; keep sending
            if proto == "tcp":
                if not data:
                    out["error"] = "eof"
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    seen(line.decode())
            else:
                seen(data.decode().strip())
        if proto == "udp":
            # Late answers of the last messages.
            s.settimeout(1.0)
            try:
                while True:
                    seen(s.recv(65535).decode().strip())
            except (socket.timeout, ConnectionRefusedError):
                pass
    except ConnectionResetError:
        out["error"] = "reset"
    except socket.timeout:
        out["error"] = "timeout"
    except OSError as e:
        out["error"] = f"os error {e.errno}"
    out["answered"] = len(answered)
    out["lost"] = out["sent"] - len(answered)
    print(json.dumps(out))


def main():
    mode = sys.argv[1]
    a = sys.argv[2:]
    if mode == "udp-echo":
        udp_echo(a[0], int(a[1]), float(a[2]))
    elif mode == "tcp-echo":
        tcp_echo(a[0], int(a[1]), float(a[2]))
    elif mode == "udp-ask":
        udp_ask(a[0], int(a[1]), a[2], float(a[3]))
    elif mode == "tcp-ask":
        tcp_ask(a[0], int(a[1]), a[2], float(a[3]))
    elif mode == "udp-sink":
        udp_sink(a[0], int(a[1]), float(a[2]))
    elif mode == "udp-flood":
        udp_flood(a[0], int(a[1]), int(a[2]), float(a[3]))
    elif mode == "flow-server":
        flow_server(a[0], int(a[1]), float(a[2]))
    elif mode == "flow":
        flow(a[0], int(a[1]), a[2], float(a[3]), float(a[4]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
