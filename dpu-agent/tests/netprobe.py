#!/usr/bin/env python3
"""Traffic endpoints for the dpu-agent namespace tests, run inside a namespace with the
kernel's own stack (which checks checksums). Every mode stops on its own (timeouts).

  udp-echo ADDR PORT SECONDS         echo datagrams back, prefixed with the sender "ip:port|"
  tcp-echo ADDR PORT SECONDS         echo one connection's bytes back, prefixed the same way
  udp-ask  DST PORT MSG SECONDS      send MSG, print the reply (or TIMEOUT)
  tcp-ask  DST PORT MSG SECONDS      connect, send MSG, print the reply (or TIMEOUT)
  udp-sink ADDR PORT SECONDS         count datagrams: print "packets bytes first_ts last_ts"
  udp-flood DST PORT SIZE SECONDS    send SIZE-byte datagrams as fast as possible
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
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
