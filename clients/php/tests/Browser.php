<?php

declare(strict_types=1);

namespace Wsboard\Tests;

/** A minimal WebSocket client for the tests: connect, then read the server's text frames. */
final class Browser
{
    /** @var resource */
    private $stream;
    private string $buffer = '';

    public function __construct(int $port, string $query)
    {
        $stream = stream_socket_client("tcp://127.0.0.1:$port", $errno, $errstr, 5);
        if ($stream === false) {
            throw new \RuntimeException("cannot connect: $errstr");
        }
        stream_set_timeout($stream, 5);
        $key = base64_encode(random_bytes(16));
        fwrite($stream, "GET /websocket?$query HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nUpgrade: websocket\r\n"
            . "Connection: Upgrade\r\nSec-WebSocket-Key: $key\r\nSec-WebSocket-Version: 13\r\n\r\n");
        $head = '';
        while (!str_contains($head, "\r\n\r\n")) {
            $chunk = fread($stream, 1);
            if ($chunk === '' || $chunk === false) {
                throw new \RuntimeException("no 101: $head");
            }
            $head .= $chunk;
        }
        if (!str_starts_with($head, 'HTTP/1.1 101')) {
            throw new \RuntimeException("no 101: $head");
        }
        $this->stream = $stream;
    }

    private function take(int $size): string
    {
        while (strlen($this->buffer) < $size) {
            $chunk = fread($this->stream, 65536);
            if ($chunk === '' || $chunk === false) {
                throw new \RuntimeException('the server sent nothing in time');
            }
            $this->buffer .= $chunk;
        }
        $data = substr($this->buffer, 0, $size);
        $this->buffer = substr($this->buffer, $size);
        return $data;
    }

    /** The next text frame's payload (pings are skipped). */
    public function receive(): string
    {
        while (true) {
            [$first, $second] = array_values(unpack('C2', $this->take(2)));
            $length = $second & 0x7f;
            if ($length === 126) {
                $length = unpack('n', $this->take(2))[1];
            } elseif ($length === 127) {
                $length = unpack('J', $this->take(8))[1];
            }
            $payload = $this->take($length);
            if (($first & 0x0f) === 1) {
                return $payload;
            }
        }
    }

    public function close(): void
    {
        fclose($this->stream);
    }
}
