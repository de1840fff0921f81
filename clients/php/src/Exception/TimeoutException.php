<?php

declare(strict_types=1);

namespace Wsboard\Exception;

/** No answer in time, or (with --redis) a process holding the target did not confirm. */
final class TimeoutException extends WsboardException
{
}
